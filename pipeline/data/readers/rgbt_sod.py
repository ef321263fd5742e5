"""RGB-thermal salient object detection benchmarks VT821 (Wang et al. 2018), VT1000 (Tu et al.
2019) and VT5000 (Tu et al. 2022), registered as `vt821`, `vt1000`, `vt5000`.

Layout of the releases (the one RGB-T SOD code bases such as the mmseg `VTDataset` follow):

    VT5000:         <root>/Train/{RGB,T,GT}/<name>.*  and  <root>/Test/{RGB,T,GT}/<name>.*
    VT821, VT1000:  <root>/{RGB,T,GT}/<name>.*        (test-only benchmarks: split `test`)

RGB and T are JPEGs, GT PNG in VT5000 and JPEG in some copies of the small sets; files pair by
name whatever the extension. Thermal frames are greyscale saved as 3-channel JPEG: identical
channels become HxW uint8, anything else stays HxWx3 as stored.

GT is binarised at 128 into {0: background, 1: salient}. Keeping 0..255 would carry JPEG
ringing as fake "soft" saliency and is not a class map; 128 is the midpoint every SOD metric
(and the usual `gt > 0.5` after /255) uses. 255 is ignore_index only for padding.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from pipeline.data.readers.base import (
    ReleaseReader,
    index_by_stem,
    listed_records,
    register_reader,
)
from pipeline.data.types import LABEL, RGB, Record

SALIENCY_THRESHOLD = 128


class RgbtSodReader(ReleaseReader):
    """Shared reader of the VT benchmarks; subclasses only say which folders are splits."""

    split_dirs: ClassVar[dict[str, str]] = {}
    modalities = (RGB, "thermal")
    class_names = ("background", "salient")
    ignore_index = 255
    palette = ((0, 0, 0), (255, 255, 255))
    grey_sources = ("thermal",)

    def splits(self) -> list[str]:
        return list(self.split_dirs)

    def records(self, split: str) -> list[Record]:
        split_root = self.root / self.split_dirs[split]
        if not (split_root / "RGB").is_dir():
            raise FileNotFoundError(f"{self.name}: folder {split_root / 'RGB'} does not exist")
        folders = {RGB: split_root / "RGB", "thermal": split_root / "T", LABEL: split_root / "GT"}
        return listed_records(split, sorted(index_by_stem(split_root / "RGB")), folders)

    def convert_label(self, label: np.ndarray) -> np.ndarray:
        return (label >= SALIENCY_THRESHOLD).astype(np.uint8)


@register_reader("vt821")
class VT821Reader(RgbtSodReader):
    split_dirs = {"test": "."}


@register_reader("vt1000")
class VT1000Reader(RgbtSodReader):
    split_dirs = {"test": "."}


@register_reader("vt5000")
class VT5000Reader(RgbtSodReader):
    split_dirs = {"train": "Train", "test": "Test"}
