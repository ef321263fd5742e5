"""MFNet (Ha et al., IROS 2017): RGB-thermal urban scenes, 1569 frames at 640x480, day and night.

Layout of the release (and of RTFNet's re-packaged copy), as read by MFNet-pytorch's
`util/MF_dataset.py`:

    <root>/images/<name>.png   4-channel PNG: R, G, B, thermal (uint8)
    <root>/labels/<name>.png   class ids 0..8
    <root>/train.txt, val.txt, test.txt   one name per line, no extension

Names end in `D` (day) or `N` (night), e.g. `00001D`, `01234N`; the reader records
`meta["condition"]`, which is what the `test_day`/`test_night` lists of RTFNet select.

Ignore policy: class 0 `unlabeled` stays a class (train id 0). MFNet, RTFNet and CMX/CMNeXt all
train on it and report 9-class mIoU including it, so turning it into `ignore_index` would break
comparability. `ignore_index` is 255, a value no release pixel carries: it only marks padding
added downstream and any out-of-range id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.image_io import read_image
from pipeline.data.readers.base import ReleaseReader, listed_records, read_split_names, register_reader
from pipeline.data.types import LABEL, RGB, Record, SampleError

_IMAGE = "image"  # source name of the 4-channel file that holds rgb + thermal
_CONDITIONS = {"D": "day", "N": "night"}


@register_reader("mfnet")
class MFNetReader(ReleaseReader):
    """MFNet's native layout; splits are the release's train/val/test lists."""

    modalities = (RGB, "thermal")
    class_names = (
        "unlabeled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump",
    )
    ignore_index = 255
    # RTFNet/MFNet `get_palette()` order.
    palette = (
        (0, 0, 0), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 192),
        (128, 128, 0), (64, 64, 128), (192, 128, 128), (192, 64, 0),
    )
    split_names = ("train", "val", "test")

    def splits(self) -> list[str]:
        return list(self.split_names)

    def records(self, split: str) -> list[Record]:
        names = read_split_names(self.root / f"{split}.txt")
        meta = {name: {"condition": _CONDITIONS.get(name[-1:].upper())} for name in names}
        folders = {_IMAGE: self.root / "images", LABEL: self.root / "labels"}
        return listed_records(split, names, folders, meta)

    def decode(self, record: Record, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        arrays = {LABEL: read_image(record.files[LABEL])}
        if _IMAGE in record.files:
            arrays.update(split_rgbt(read_image(record.files[_IMAGE]), record.files[_IMAGE]))
        return arrays


def split_rgbt(image: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    """RGB (HxWx3) and thermal (HxW) from MFNet's RGBA-ordered 4-channel frame."""
    if image.ndim != 3 or image.shape[2] != 4 or image.dtype != np.uint8:
        message = f"{path}: expected an 8-bit 4-channel RGB+thermal PNG, got {image.dtype} {image.shape}"
        raise SampleError("unsupported", message, path)
    return {RGB: np.ascontiguousarray(image[..., :3]), "thermal": np.ascontiguousarray(image[..., 3])}
