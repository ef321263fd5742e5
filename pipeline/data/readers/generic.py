"""Generic layouts for users' own data: paired modalities by file name, a plain folder of
unlabeled images of one modality, and a union of datasets as one pool."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.readers.base import DatasetReader, build_reader, index_by_stem, register_reader, sorted_records
from pipeline.data.readers.boxes import BOX_FILE, index_label_files, read_yolo_boxes
from pipeline.data.types import LABEL, Record, Sample, sample_key


@register_reader("paired")
class PairedReader(DatasetReader):
    """`<root>/<split>/<modality>/<name>.<ext>`; files of one sample share `<name>`.

    Labels are the `label` modality. `splits` maps split names to folders under `root`
    (`.` for a root that holds the modality folders directly, as RoadScene does); by default
    every sub-folder of `root` is a split. `modality_dirs` renames folders to modalities
    (e.g. `{rgb: visible, thermal: infrared}`). A name missing from one modality folder
    becomes a `missing_modality` skip. Class names, ignore index and palette are given
    directly or by `classes_file`, a JSON file (path relative to `root`) with those keys.
    Detection boxes, when `box_dir` names a folder beside the modality folders, are YOLO text
    files `<name>.txt` (a name without one has no object) over `box_class_names` (given, or
    the classes file's `box_class_names`).
    """

    def __init__(
        self,
        root: str | Path,
        modalities: Sequence[str],
        splits: Mapping[str, str] | None = None,
        modality_dirs: Mapping[str, str] | None = None,
        class_names: Sequence[str] | None = None,
        ignore_index: int | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        classes_file: str | None = None,
        recursive: bool = False,
        box_dir: str | None = None,
        box_class_names: Sequence[str] | None = None,
    ):
        super().__init__(root)
        if classes_file is not None:
            classes = _read_classes_file(self.root / classes_file)
            class_names = class_names or classes.get("class_names")
            ignore_index = ignore_index if ignore_index is not None else classes.get("ignore_index")
            palette = palette or classes.get("palette")
            box_class_names = box_class_names or classes.get("box_class_names")
        if box_dir is not None and not box_class_names:
            raise ValueError(f"paired: box_dir={box_dir!r} needs box_class_names (or a classes_file with them)")
        self.box_dir = box_dir
        self.box_class_names = tuple(box_class_names) if box_dir is not None else None
        self.modalities = tuple(m for m in modalities if m != LABEL)
        self.modality_dirs = {m: m for m in (*self.modalities, LABEL)} | dict(modality_dirs or {})
        if splits is None:
            splits = {p.name: p.name for p in sorted(self.root.iterdir()) if p.is_dir()}
        self.split_dirs = dict(splits)
        self.class_names = tuple(class_names) if class_names else None
        self.ignore_index = ignore_index
        self.palette = tuple(tuple(c) for c in palette) if palette else None
        self.recursive = recursive

    def splits(self) -> list[str]:
        return list(self.split_dirs)

    def records(self, split: str) -> list[Record]:
        split_root = self.root / self.split_dirs[split]
        sources = list(self.modalities)
        if (split_root / self.modality_dirs[LABEL]).is_dir():
            sources.append(LABEL)
        indices = {s: index_by_stem(split_root / self.modality_dirs[s], self.recursive) for s in sources}
        names = sorted(set().union(*indices.values()))
        if self.box_dir is not None:
            indices[BOX_FILE] = index_label_files(split_root / self.box_dir, ".txt")
            sources.append(BOX_FILE)
        return sorted_records(
            Record(
                key=sample_key(split, name),
                files={s: indices[s][name] for s in sources if name in indices[s]},
                meta={"split": split, "name": name},
            )
            for name in names
        )

    def load(self, record: Record) -> Sample:
        """Images (and the label) as stored, plus the boxes when the layout has them."""
        box_file = record.files.get(BOX_FILE)
        images = Record(record.key, {s: p for s, p in record.files.items() if s != BOX_FILE}, record.meta)
        sample = super().load(images)
        if self.box_dir is not None:
            size = next(v.shape[:2] for k, v in sample.items() if k in self.modalities)
            sample.update(read_yolo_boxes(box_file, size, len(self.box_class_names)))
        return sample


def _read_classes_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"classes_file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"classes_file {path} is not valid JSON: {err}") from err


@register_reader("folder")
class FolderReader(DatasetReader):
    """Any nesting of image files of one modality, no labels: an unlabeled pool for Stage 1.

    Accepts PNG/JPEG/TIFF/BMP at 8 or 16 bits with 1 or 3 channels. Every other file is
    listed and then skipped as `not_an_image`, so stray files show up in the manifest.
    """

    def __init__(self, root: str | Path, modality: str, split: str = "unlabeled"):
        super().__init__(root)
        self.modalities = (modality,)
        self.split = split

    def splits(self) -> list[str]:
        return [self.split]

    def records(self, split: str) -> list[Record]:
        if split != self.split:
            raise KeyError(f"folder reader has only the split {self.split!r}, not {split!r}")
        (modality,) = self.modalities
        return sorted_records(
            Record(key=sample_key(name), files={modality: path}, meta={"name": name})
            for name, path in index_by_stem(self.root, recursive=True).items()
        )


@register_reader("union")
class UnionReader(DatasetReader):
    """Several datasets as one unlabeled pool of one modality, e.g. Stage 1's thermal images from
    HIT-UAV, RoadScene and MSRS's training pairs.

    `parts` maps a part name to a reader config whose `root` is relative to `root` (the folder DVC
    tracks for the union) and, optionally, `use_splits`: the part's splits that join the pool
    (all by default; a labelled dataset's test split should stay out of a pool its tasks use).
    The union has the one split `split`; keys are prefixed by the part's name, and samples keep
    only `modality`.
    """

    def __init__(self, root: str | Path, modality: str, parts: Mapping[str, Mapping[str, Any]],
                 split: str = "unlabeled"):
        super().__init__(root)
        self.modalities = (modality,)
        self.split = split
        self.parts: dict[str, tuple[DatasetReader, list[str] | None]] = {}
        for name, config in parts.items():
            config = dict(config)
            use = config.pop("use_splits", None)
            if "root" not in config:
                raise ValueError(f"union part {name!r} has no root")
            reader = build_reader({**config, "root": str(self.root / config["root"])}, where=f"union part {name}")
            if modality not in reader.modalities:
                raise ValueError(f"union part {name!r} ({reader.name}) has no {modality!r} images "
                                 f"(it gives {list(reader.modalities)})")
            self.parts[name] = (reader, list(use) if use is not None else None)

    def splits(self) -> list[str]:
        return [self.split]

    def records(self, split: str) -> list[Record]:
        if split != self.split:
            raise KeyError(f"union reader has only the split {self.split!r}, not {split!r}")
        records = []
        for name, (reader, use) in self.parts.items():
            for part_split in use if use is not None else reader.splits():
                records += [Record(key=sample_key(name, r.key), files=r.files,
                                   meta={**r.meta, "part": name, "part_key": r.key})
                            for r in reader.records(part_split)]
        return sorted_records(records)

    def load(self, record: Record) -> Sample:
        reader, _ = self.parts[record.meta["part"]]
        meta = {k: v for k, v in record.meta.items() if k not in ("part", "part_key")}
        sample = reader.load(Record(record.meta["part_key"], record.files, meta))
        (modality,) = self.modalities
        return {"key": record.key, "meta": {**sample["meta"], "part": record.meta["part"]}, modality: sample[modality]}
