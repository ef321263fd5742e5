"""SUN RGB-D (Song et al., CVPR 2015): 10335 indoor RGB-D frames from four sensors, 5285 train
/ 5050 test, 37-class segmentation labels.

Two layouts, chosen with `layout`:

`flat` (default), the package RGB-X segmentation works train on (DFormer's SUNRGBD):

    <root>/RGB/<name>.jpg, <root>/Depth/<name>.png, <root>/labels/<name>.png (or Label/)
    <root>/train.txt, test.txt   lines `<name>` or `RGB/<name>.jpg`

    Labels are 0 = unlabeled, 1..37 = classes, shifted to 255 / 0..36 like NYUv2. Depth is read
    as stored unless `decode_depth: true` (set it when the Depth PNGs are copies of the release
    files, i.e. still bit-rotated; see below).

`release`, the official `SUNRGBD.zip` as unpacked, next to Ankur Handa's split lists
(github.com/ankurhanda/sunrgbd-meta-data, the 5285/5050 split everybody uses):

    <root>/sunrgbd_training_images.txt, sunrgbd_testing_images.txt
        lines `SUNRGBD/<sensor>/<...>/<scene>/image/<frame>.jpg`
    <root>/SUNRGBD/<sensor>/<...>/<scene>/image/<frame>.jpg
    <root>/SUNRGBD/<sensor>/<...>/<scene>/depth/<frame>.png       raw sensor depth
    <root>/SUNRGBD/<sensor>/<...>/<scene>/depth_bfx/<frame>.png   depth after hole filling

    No labels: the 37-class maps exist only inside the toolbox's `SUNRGBD2Dseg.mat` (MATLAB v7.3,
    HDF5), which this project cannot read without a new dependency. This layout yields RGB-D
    pairs for unlabeled pre-training.

Depth encoding of the release: 16-bit PNGs hold millimetres rotated left by 3 bits. The
toolbox (`read3dPoints.m`) decodes `bitor(bitshift(d,-3), bitshift(d,16-3))`, a 16-bit
rotation right by 3, then clamps at 8 m. `decode_sunrgbd_depth` does the rotation only, so the
result is uint16 millimetres with nothing clamped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.data.readers.base import (
    ReleaseReader,
    index_by_stem,
    listed_records,
    read_split_list,
    read_split_names,
    register_reader,
    sorted_records,
    voc_palette,
)
from pipeline.data.types import LABEL, RGB, Record, SampleError, sample_key

SUN37_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "fridge", "tv", "paper", "towel", "shower curtain",
    "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag",
)
RELEASE_LISTS = {"train": "sunrgbd_training_images.txt", "test": "sunrgbd_testing_images.txt"}


def decode_sunrgbd_depth(stored: np.ndarray) -> np.ndarray:
    """Release depth PNG value -> millimetres: rotate the 16 bits right by 3."""
    if stored.dtype != np.uint16:
        raise ValueError(f"SUN RGB-D depth must be uint16, got {stored.dtype}")
    return (stored >> 3) | (stored << 13)  # uint16 arithmetic drops the bits shifted out


@register_reader("sun_rgbd")
class SunRgbdReader(ReleaseReader):
    """SUN RGB-D as the DFormer package (`flat`) or the official unpacked release (`release`)."""

    modalities = (RGB, "depth")
    class_names = SUN37_CLASSES
    ignore_index = 255
    first_class_id = 1  # release id 0 = unlabeled -> ignore_index
    palette = voc_palette(37)

    def __init__(
        self,
        root: str | Path,
        layout: Literal["flat", "release"] = "flat",
        depth_source: Literal["depth_bfx", "depth"] = "depth_bfx",
        decode_depth: bool | None = None,
    ):
        super().__init__(root)
        if layout not in ("flat", "release"):
            raise ValueError(f"sun_rgbd: layout must be 'flat' or 'release', not {layout!r}")
        if depth_source not in ("depth_bfx", "depth"):
            raise ValueError(f"sun_rgbd: depth_source must be 'depth_bfx' or 'depth', not {depth_source!r}")
        self.layout = layout
        self.depth_source = depth_source
        self.decode_depth = (layout == "release") if decode_depth is None else decode_depth
        self.has_labels = layout == "flat"

    def splits(self) -> list[str]:
        return ["train", "test"]

    def records(self, split: str) -> list[Record]:
        return self._flat_records(split) if self.layout == "flat" else self._release_records(split)

    def _flat_records(self, split: str) -> list[Record]:
        names = read_split_names(self.root / f"{split}.txt")
        label_dirs = [self.root / d for d in ("labels", "Label") if (self.root / d).is_dir()]
        label_dir = label_dirs[0] if label_dirs else self.root / "labels"
        folders = {RGB: self.root / "RGB", "depth": self.root / "Depth", LABEL: label_dir}
        return listed_records(split, names, folders)

    def _release_records(self, split: str) -> list[Record]:
        records = []
        for line in read_split_list(self.root / RELEASE_LISTS[split]):
            rgb = self.root / line
            scene = Path(line).parent.parent
            files = {RGB: rgb} if rgb.is_file() else {}
            depth = _scene_frame(self.root / scene / self.depth_source, rgb.stem)
            if depth is not None:
                files["depth"] = depth
            sensor = scene.parts[1] if len(scene.parts) > 1 else None  # SUNRGBD/<sensor>/...
            meta = {"split": split, "scene": scene.as_posix(), "sensor": sensor}
            records.append(Record(key=sample_key(split, scene.as_posix()), files=files, meta=meta))
        return sorted_records(records)

    def decode(self, record: Record, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        arrays = super().decode(record, meta)
        if self.decode_depth and "depth" in arrays:
            if arrays["depth"].dtype != np.uint16:
                path = record.files["depth"]
                message = f"{path}: SUN RGB-D depth must be 16-bit, got {arrays['depth'].dtype}"
                raise SampleError("unsupported", message, path)
            arrays["depth"] = decode_sunrgbd_depth(arrays["depth"])
        return arrays


def _scene_frame(folder: Path, stem: str) -> Path | None:
    """The frame of a scene folder: the file named like the RGB frame, else its only image
    (a few sub-datasets name depth differently from the colour frame)."""
    index = index_by_stem(folder)
    if stem in index:
        return index[stem]
    return next(iter(index.values())) if len(index) == 1 else None
