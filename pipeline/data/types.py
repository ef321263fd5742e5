"""The records and samples every dataset reader produces.

A reader first *lists* its dataset as `Record`s (cheap: paths only), then *loads* one record
into a `Sample` dict. Keeping the two apart lets the shard stage checksum sources, report
skipped inputs by file name, and show progress over a known total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# A loaded sample: {"key": str, "<modality>": ndarray HxW or HxWxC, "label": ndarray HxW,
# "meta": dict}. "rgb" is uint8 HxWx3; other modalities keep their native dtype. Detection
# samples add "boxes" (float32 Nx4, xyxy in pixels), "box_labels" (int64 N, class ids) and
# "box_crowd" (uint8 N: 1 marks a region that evaluation ignores, never a training target).
Sample = dict[str, Any]

LABEL = "label"
RGB = "rgb"
BOXES = "boxes"
BOX_LABELS = "box_labels"
BOX_CROWD = "box_crowd"
BOX_FIELDS = (BOXES, BOX_LABELS, BOX_CROWD)


@dataclass(frozen=True)
class Record:
    """One sample of a dataset before decoding.

    `files` maps a source name (usually the modality) to the file it is read from; a reader
    whose file holds several modalities (MFNet's 4-channel PNG) uses its own source names.
    """

    key: str
    files: dict[str, Path]
    meta: dict[str, Any] = field(default_factory=dict)


class SampleError(Exception):
    """A record that cannot become a valid sample; the shard stage skips and lists it.

    `reason` is one of the short codes the manifest counts (`unreadable`, `size_mismatch`,
    `missing_modality`, ...); the message says which file and why.
    """

    def __init__(self, reason: str, message: str, path: Path | str | None = None):
        super().__init__(message)
        self.reason = reason
        self.path = str(path) if path is not None else None

    def __reduce__(self):  # picklable across the shard worker processes
        return (SampleError, (self.reason, str(self), self.path))


def sample_key(*parts: str) -> str:
    """Build a WebDataset-safe key: WebDataset splits member names at the first dot,
    so keys must contain none; path separators become '__'."""
    key = "__".join(p.strip("/") for p in parts if p)
    return key.replace("/", "__").replace(".", "_").replace(" ", "_")


def check_same_size(sample: Sample, record: Record) -> None:
    """Raise `size_mismatch` when the modalities (and label) of a sample differ in HxW."""
    sizes = {
        name: value.shape[:2]
        for name, value in sample.items()
        if isinstance(value, np.ndarray) and name not in BOX_FIELDS
    }
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"{name} {h}x{w}" for name, (h, w) in sizes.items())
        raise SampleError(
            "size_mismatch",
            f"{record.key}: modalities differ in size ({desc})",
            next(iter(record.files.values()), None),
        )
