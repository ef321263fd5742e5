"""Layouts with YOLO text box labels: Ultralytics' (`yolo`) and the MSRS detection labels (`msrs_det`).

Ultralytics (`yolo`):

    <root>/images/<split>/<name>.<ext>    one modality (`modality`, rgb by default)
    <root>/labels/<split>/<name>.txt      `class cx cy w h` per line, normalised; none: no object
    <root>/data.yaml                      `names:` a list or {id: name} (or give `class_names`)

MSRS detection labels (`msrs_det`, the MSRS-detection-label release over MSRS image pairs):

    <root>/visible/<name>.png             RGB
    <root>/infrared/<name>.png            thermal, 8-bit grey
    <root>/labels/{fusion,infrared,visible}/<name>.txt   three annotation sets (`label_set`)
    <root>/labels/classes.txt             `0 person` / `1 bicycle` / `2 car`

Names end in D (day) or N (night), recorded as `meta["condition"]`. The release has no splits:
`splits` gives fractions cut with `split_seed`, stratified by day/night (`seeded_splits`), so
the split is the same on every machine and for every task that reads these pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from pipeline.data.readers.base import index_by_stem, register_reader, sorted_records
from pipeline.data.readers.boxes import BOX_FILE, DetectionReader, index_label_files, read_yolo_boxes, seeded_splits
from pipeline.data.types import RGB, Record, sample_key

_CONDITIONS = {"D": "day", "N": "night"}
DEFAULT_SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


class YoloTextReader(DetectionReader):
    """Boxes from YOLO text files, for any layout that lists records with a `box_file`."""

    def read_boxes(self, path: Path | None, size: tuple[int, int]) -> dict[str, np.ndarray]:
        return read_yolo_boxes(path, size, len(self.class_names))


@register_reader("yolo")
class UltralyticsReader(YoloTextReader):
    """Ultralytics' layout (module docstring); every folder under `images/` is a split."""

    box_file_required = False  # Ultralytics: an image without a label file has no object

    def __init__(self, root: str | Path, modality: str = RGB, class_names: Sequence[str] | None = None,
                 data_yaml: str = "data.yaml"):
        super().__init__(root)
        self.modalities = (modality,)
        self.grey_sources = () if modality == RGB else (modality,)
        self.class_names = tuple(class_names) if class_names else _yaml_names(self.root / data_yaml)

    def splits(self) -> list[str]:
        return sorted(p.name for p in (self.root / "images").iterdir() if p.is_dir())

    def records(self, split: str) -> list[Record]:
        images = index_by_stem(self.root / "images" / split)
        if not images:
            raise FileNotFoundError(f"yolo: no images in {self.root / 'images' / split}")
        labels = self.root / "labels" / split
        (modality,) = self.modalities
        return sorted_records(
            Record(key=sample_key(split, name),
                   files={modality: path, **({BOX_FILE: labels / f"{name}.txt"} if (labels / f"{name}.txt").is_file()
                                             else {})},
                   meta={"split": split, "name": name})
            for name, path in images.items()
        )


def _yaml_names(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"yolo: {path} does not exist; give class_names or data_yaml")
    names = (yaml.safe_load(path.read_text()) or {}).get("names")
    if isinstance(names, Mapping):
        return tuple(names[k] for k in sorted(names))
    if isinstance(names, list) and names:
        return tuple(names)
    raise ValueError(f"yolo: {path} has no `names:` list or mapping")


@register_reader("msrs_det")
class MSRSDetectionReader(YoloTextReader):
    """The MSRS detection labels over MSRS RGB/thermal pairs (module docstring)."""

    modalities = (RGB, "thermal")
    grey_sources = ("thermal",)
    label_sets = ("fusion", "infrared", "visible")

    def __init__(self, root: str | Path, label_set: str = "fusion", splits: Mapping[str, float] | None = None,
                 split_seed: int = 0):
        super().__init__(root)
        if label_set not in self.label_sets:
            raise ValueError(f"msrs_det: label_set {label_set!r} is not one of {list(self.label_sets)}")
        self.label_set = label_set
        self.class_names = _classes_txt(self.root / "labels" / "classes.txt")
        self.fractions, self.split_seed = dict(splits or DEFAULT_SPLITS), split_seed

    @cached_property
    def indices(self) -> dict[str, dict[str, Path]]:
        folders = {RGB: self.root / "visible", "thermal": self.root / "infrared"}
        indices = {source: index_by_stem(folder) for source, folder in folders.items()}
        indices[BOX_FILE] = index_label_files(self.root / "labels" / self.label_set, ".txt")
        if not indices[RGB]:
            raise FileNotFoundError(f"msrs_det: no images in {folders[RGB]}")
        return indices

    @cached_property
    def split_names(self) -> dict[str, list[str]]:
        return seeded_splits(sorted(self.indices[RGB]), self.fractions, self.split_seed,
                             group=lambda name: name[-1:].upper())

    def splits(self) -> list[str]:
        return list(self.fractions)

    def name_meta(self, name: str) -> dict[str, str | None]:
        return {"condition": _CONDITIONS.get(name[-1:].upper())}


def _classes_txt(path: Path) -> tuple[str, ...]:
    """`<id> <name>` lines (the release's classes.txt) in id order; absent: the release's three."""
    if not path.is_file():
        return ("person", "bicycle", "car")
    pairs = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
    return tuple(name.strip() for _, name in sorted(pairs, key=lambda p: int(p[0])))
