"""Layouts with Pascal-VOC XML box labels: VOC itself (`voc`), HIT-UAV (`hit_uav`) and M3FD (`m3fd`).

Pascal VOC (`voc`):

    <root>/JPEGImages/<name>.jpg             one modality (`modality`, rgb by default)
    <root>/Annotations/<name>.xml            <object><name>, <difficult>, <bndbox>
    <root>/ImageSets/Main/<split>.txt        one name per line

HIT-UAV (`hit_uav`, Suo et al. 2023; aerial thermal, 640x512 8-bit grey): the release's
`normal_xml` folder is this layout; a flat copy with `images/` and `annotations/` (as in
`../shared/data/hit_uav`) is read with `image_dir=images annotation_dir=annotations`. Classes
Person, Car, Bicycle, OtherVehicle (the release's ids 0-3); `DontCare` marks regions too
ambiguous to label: class-agnostic ignore regions (crowd boxes, `boxes.py`).

M3FD (`m3fd`, Liu et al. 2022, the `M3FD_Detection` release): aligned visible / infrared pairs

    <root>/Vis/<name>.png   <root>/Ir/<name>.png   <root>/Annotation/<name>.xml

with classes People, Car, Bus, Motorcycle, Lamp, Truck.

A layout without split lists is split by `splits` fractions with `split_seed` (`seeded_splits`,
stratified by `group_pattern`'s `group` capture when given, e.g. day/night in the file name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.data.readers.base import index_by_stem, read_split_names, register_reader
from pipeline.data.readers.boxes import BOX_FILE, DetectionReader, index_label_files, read_voc_boxes, seeded_splits
from pipeline.data.types import RGB


@register_reader("voc")
class VOCReader(DetectionReader):
    """Pascal-VOC layout (module docstring); folder names and classes are options."""

    def __init__(self, root: str | Path, class_names: Sequence[str], ignore_names: Sequence[str] = (),
                 modality: str = RGB, image_dir: str = "JPEGImages", annotation_dir: str = "Annotations",
                 split_dir: str = "ImageSets/Main", splits: Mapping[str, float] | None = None, split_seed: int = 0,
                 group_pattern: str | None = None):
        super().__init__(root)
        self.modalities = (modality,)
        self.grey_sources = () if modality == RGB else (modality,)
        self._setup({modality: image_dir}, annotation_dir, class_names, ignore_names, split_dir, splits,
                    split_seed, group_pattern)

    def _setup(self, image_dirs: Mapping[str, str], annotation_dir: str, class_names: Sequence[str],
               ignore_names: Sequence[str], split_dir: str | None, splits: Mapping[str, float] | None,
               split_seed: int, group_pattern: str | None) -> None:
        self.class_names = tuple(class_names)
        self.ignore_names = tuple(ignore_names)
        self.image_dirs, self.annotation_dir = dict(image_dirs), annotation_dir
        self.split_lists = self.root / split_dir if split_dir else None
        self.fractions = dict(splits) if splits is not None else None
        self.split_seed = split_seed
        self.group_pattern = re.compile(group_pattern) if group_pattern else None

    @cached_property
    def indices(self) -> dict[str, dict[str, Path]]:
        folders = {m: self.root / d for m, d in self.image_dirs.items()}
        indices = {source: index_by_stem(folder) for source, folder in folders.items()}
        indices[BOX_FILE] = index_label_files(self.root / self.annotation_dir, ".xml")
        first = next(iter(folders))
        if not indices[first]:
            raise FileNotFoundError(f"{self.name}: no images in {folders[first]}")
        return indices

    @cached_property
    def split_names(self) -> dict[str, list[str]]:
        lists = self.split_lists
        if self.fractions is not None:
            names = sorted(self.indices[next(iter(self.image_dirs))])
            return seeded_splits(names, self.fractions, self.split_seed,
                                 group=lambda name: _group(self.group_pattern, name))
        if lists is not None and lists.is_dir() and any(lists.glob("*.txt")):
            return {p.stem: read_split_names(p) for p in sorted(lists.glob("*.txt"))}
        raise ValueError(f"{self.name}: {lists} has no split lists; give `splits` fractions "
                         f"(e.g. {{train: 0.8, test: 0.2}}) to split {self.root} with `split_seed`")

    def splits(self) -> list[str]:
        return list(self.split_names)

    def read_boxes(self, path: Path | None, size: tuple[int, int]) -> dict[str, np.ndarray]:
        return read_voc_boxes(path, size, self.class_names, self.ignore_names)


def _group(pattern: re.Pattern | None, name: str) -> str | None:
    match = pattern.search(name) if pattern else None
    if match is None:
        return None
    return match.group("group") if "group" in match.groupdict() else match.group(0)


@register_reader("hit_uav")
class HITUAVReader(VOCReader):
    """HIT-UAV (module docstring): thermal only, DontCare as ignore regions."""

    def __init__(self, root: str | Path, image_dir: str = "JPEGImages", annotation_dir: str = "Annotations",
                 split_dir: str = "ImageSets/Main", splits: Mapping[str, float] | None = None, split_seed: int = 0,
                 group_pattern: str | None = None):
        super().__init__(root, class_names=("Person", "Car", "Bicycle", "OtherVehicle"), ignore_names=("DontCare",),
                         modality="thermal", image_dir=image_dir, annotation_dir=annotation_dir, split_dir=split_dir,
                         splits=splits, split_seed=split_seed, group_pattern=group_pattern)


@register_reader("m3fd")
class M3FDReader(VOCReader):
    """M3FD's detection release (module docstring): visible + infrared, no split lists."""

    modalities = (RGB, "thermal")
    grey_sources = ("thermal",)

    def __init__(self, root: str | Path, splits: Mapping[str, float] | None = None, split_seed: int = 0):
        DetectionReader.__init__(self, root)
        self._setup({RGB: "Vis", "thermal": "Ir"}, "Annotation",
                    ("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck"), (), None,
                    dict(splits or {"train": 0.8, "test": 0.2}), split_seed, None)
