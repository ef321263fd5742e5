"""Box labels next to images: YOLO text and Pascal-VOC XML, parsed into a sample's box arrays,
and the base of the detection readers.

A detection sample carries `boxes` (float32 Nx4, xyxy in pixels of the image as stored),
`box_labels` (int64 N) and `box_crowd` (uint8 N). Crowd boxes are regions evaluation ignores
(COCO's `iscrowd`: a detection that lands on one is neither a true nor a false positive) and
training never uses as targets. They come from VOC's `difficult` flag (crowd for its own class)
and from an "ignore" class such as HIT-UAV's `DontCare` (a class-agnostic region, so one crowd
box per class). Coordinates outside the image are clipped; boxes with no area after clipping
are dropped.

Conventions of the two formats:
- YOLO text (Ultralytics): one `class cx cy w h` line per box, normalised by the image size; an
  empty or missing file means no object (Ultralytics treats such images as background).
- Pascal VOC XML: `<object><name>`, `<difficult>`, `<bndbox>` with 1-based inclusive pixel
  indices; made 0-based half-open as detectron2 reads VOC (`xmin - 1`, `ymin - 1`, `xmax`, `ymax`).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.image_io import read_image
from pipeline.data.readers.base import ReleaseReader, files_for, sorted_records, squeeze_grey, voc_palette
from pipeline.data.types import BOX_CROWD, BOX_LABELS, BOXES, Record, SampleError, sample_key

BOX_FILE = "box_file"  # source name of a record's box-label file


def index_label_files(folder: Path, suffix: str) -> dict[str, Path]:
    """Map stem -> path of the `suffix` files (`.txt`, `.xml`) in a folder ({} when it is absent)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() == suffix}


def box_arrays(boxes: Sequence[Sequence[float]], labels: Sequence[int], crowd: Sequence[bool],
               size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The sample's box entries from xyxy pixel boxes: clipped to the (H, W) image, empty ones dropped."""
    height, width = size
    xyxy = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return {
        BOXES: np.ascontiguousarray(xyxy[keep]),
        BOX_LABELS: np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
        BOX_CROWD: np.asarray(crowd, dtype=np.uint8).reshape(-1)[keep],
    }


def read_yolo_boxes(path: Path | None, size: tuple[int, int], num_classes: int) -> dict[str, np.ndarray]:
    """Boxes of a YOLO text file for an image of `size` (H, W); None or a missing file: no boxes."""
    boxes, labels = [], []
    if path is not None and path.is_file():
        height, width = size
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                cls, cx, cy, w, h = int(fields[0]), *map(float, fields[1:5])
                if len(fields) != 5:
                    raise ValueError(f"{len(fields)} fields")
            except ValueError as err:
                raise SampleError("bad_label", f"{path}:{number}: not `class cx cy w h` ({err})", path) from err
            if not 0 <= cls < num_classes:
                raise SampleError("bad_label", f"{path}:{number}: class {cls} is not in 0..{num_classes - 1}", path)
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            labels.append(cls)
    return box_arrays(boxes, labels, [False] * len(labels), size)


def read_voc_boxes(path: Path, size: tuple[int, int], class_names: Sequence[str],
                   ignore_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Boxes of a Pascal-VOC XML file; `difficult` objects and `ignore_names` become crowd boxes."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise SampleError("bad_label", f"{path}: cannot parse VOC XML ({err})", path) from err
    boxes, labels, crowd = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as err:
            raise SampleError("bad_label", f"{path}: object {name!r} has no valid <bndbox>", path) from err
        xyxy = [xmin - 1, ymin - 1, xmax, ymax]
        if name in ignore_names:  # a class-agnostic ignore region: one crowd box per class
            boxes += [xyxy] * len(class_names)
            labels += range(len(class_names))
            crowd += [True] * len(class_names)
        elif name in class_names:
            boxes.append(xyxy)
            labels.append(list(class_names).index(name))
            crowd.append((obj.findtext("difficult") or "0").strip() == "1")
        else:
            raise SampleError("bad_label", f"{path}: class {name!r} is not one of {list(class_names)} "
                              f"(or an ignored name {list(ignore_names)})", path)
    return box_arrays(boxes, labels, crowd, size)


def seeded_splits(names: Sequence[str], fractions: Mapping[str, float], seed: int,
                  group: Callable[[str], str | None] = lambda name: None) -> dict[str, list[str]]:
    """Split `names` by `fractions` (in order, summing to 1), stratified by `group` (e.g. day /
    night), with a seeded shuffle: the same names, fractions and seed give the same split.

    Each group is cut on its own, largest remainders rounding up, so every split keeps the
    groups' proportions as closely as whole samples allow.
    """
    if not fractions or any(f < 0 for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"split fractions {dict(fractions)} must be non-negative and sum to 1")
    out: dict[str, list[str]] = {split: [] for split in fractions}
    by_group: dict[str | None, list[str]] = {}
    for name in sorted(names):
        by_group.setdefault(group(name), []).append(name)
    rng = np.random.default_rng(seed)
    for group_names in (by_group[g] for g in sorted(by_group, key=str)):
        order = [group_names[i] for i in rng.permutation(len(group_names))]
        counts = _largest_remainder([f * len(order) for f in fractions.values()])
        start = 0
        for split, count in zip(fractions, counts, strict=True):
            out[split] += order[start:start + count]
            start += count
    return {split: sorted(split_names) for split, split_names in out.items()}


def _largest_remainder(shares: Sequence[float]) -> list[int]:
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[: round(sum(shares)) - sum(counts)]:
        counts[i] += 1
    return counts


class DetectionReader(ReleaseReader):
    """Base of the box-labelled layouts: images per modality plus one box file per sample.

    `read_boxes(path, size)` parses the record's `box_file` (None when the record has none) for
    an image of `size` (H, W); images are read as stored (`grey_sources` squeezed to HxW).
    """

    has_labels = False  # the image-label check of ReleaseReader; box files are checked here
    box_file_required: bool = True

    @property
    def box_class_names(self) -> tuple[str, ...] | None:  # type: ignore[override]
        """A box-only layout's classes are its detection classes."""
        return self.class_names

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:  # type: ignore[override]
        """Box colours, one per class (PASCAL-VOC's colour map)."""
        return voc_palette(len(self.class_names or ()), start=1)

    def read_boxes(self, path: Path | None, size: tuple[int, int]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # Layouts that pair files by name set these two: source -> {name: file}, split -> names.
    indices: dict[str, dict[str, Path]]
    split_names: dict[str, list[str]]

    def records(self, split: str) -> list[Record]:
        return sorted_records(
            Record(key=sample_key(split, name), files=files_for(name, self.indices),
                   meta={"split": split, "name": name, **self.name_meta(name)})
            for name in self.split_names[split]
        )

    def name_meta(self, name: str) -> dict[str, Any]:
        """Facts a layout reads from a sample's name (e.g. day or night)."""
        return {}

    def decode(self, record: Record, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.box_file_required and BOX_FILE not in record.files:
            raise SampleError("missing_modality", f"{record.key}: no box-label file", next(iter(record.files.values())))
        arrays = {s: read_image(p) for s, p in record.files.items() if s != BOX_FILE}
        arrays = {s: squeeze_grey(a) if s in self.grey_sources else a for s, a in arrays.items()}
        if not arrays:
            raise SampleError("missing_modality", f"{record.key}: no image", record.files.get(BOX_FILE))
        size = next(iter(arrays.values())).shape[:2]
        return {**arrays, **self.read_boxes(record.files.get(BOX_FILE), size)}
