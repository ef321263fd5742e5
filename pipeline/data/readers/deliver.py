"""DELIVER (Zhang et al., CVPR 2023, released with CMNeXt): CARLA-rendered driving scenes with
RGB, depth, event and LiDAR, 25 classes, front view at 1042x1042.

Layout of the release (README and `semseg/datasets/deliver.py` of jamycheung/DELIVER):

    <root>/img/<condition>/<split>/<sequence>/<frame>_rgb_front.png
    <root>/depth/.../<frame>_depth_front.png
    <root>/hha/.../<frame>_depth_front.png      HHA of depth (what CMNeXt feeds as "depth")
    <root>/event/.../<frame>_event_front.png
    <root>/lidar/.../<frame>_lidar_front.png
    <root>/semantic/.../<frame>_semantic_front.png

`condition` is cloud/fog/night/rain/sun; `split` train/val/test; sensor-failure cases are
sequences whose name carries motionblur/overexposure/underexposure/lidarjitter/eventlowres
(CMNeXt selects them by substring, as `meta["case"]` does here).

Labels: class id in the first channel, 1..25; CMNeXt maps 0 and 255 to ignore and subtracts 1,
so train id = id - 1 and everything else -> 255.

Event frames of `eventlowres` sequences are smaller than the RGB (512 vs 1042); CMNeXt resizes
events to the RGB size with nearest neighbour, and so does this reader (recording the stored
size in `meta["event_size"]`); other modalities must match the RGB size.

Depth: the encoding of `depth/` is not documented in the release. Single-channel files (and
3-channel files with equal channels) are passed through in their stored dtype. A 3-channel
8-bit file with differing channels is CARLA's 24-bit depth encoding and is decoded to float32
metres, (R + 256 G + 65536 B) / (2^24 - 1) x 1000, kept as float because CARLA's 1000 m range
does not fit uint16 millimetres. `meta["depth_encoding"]` says which case applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.readers.base import (
    ReleaseReader,
    register_reader,
    select_modalities,
    sorted_records,
)
from pipeline.data.types import LABEL, RGB, Record, sample_key

CONDITIONS = ("cloud", "fog", "night", "rain", "sun")
CASES = ("motionblur", "overexposure", "underexposure", "lidarjitter", "eventlowres")
# source -> (top folder, file-name tag)
_LAYOUT = {
    RGB: ("img", "rgb"),
    "depth": ("depth", "depth"),
    "hha": ("hha", "depth"),
    "event": ("event", "event"),
    "lidar": ("lidar", "lidar"),
    LABEL: ("semantic", "semantic"),
}


def decode_carla_depth(encoded: np.ndarray) -> np.ndarray:
    """CARLA's RGB-packed depth (uint8 HxWx3) -> float32 metres."""
    rgb = encoded[..., :3].astype(np.float64)
    normalized = (rgb[..., 0] + rgb[..., 1] * 256.0 + rgb[..., 2] * 65536.0) / (256.0**3 - 1)
    return (normalized * 1000.0).astype(np.float32)


@register_reader("deliver")
class DeliverReader(ReleaseReader):
    """DELIVER's native layout; `modalities` picks among depth, hha, event and lidar."""

    class_names = (
        "Building", "Fence", "Other", "Pedestrian", "Pole", "RoadLine", "Road", "SideWalk",
        "Vegetation", "Cars", "Wall", "TrafficSign", "Sky", "Ground", "Bridge", "RailTrack",
        "GroundRail", "TrafficLight", "Static", "Dynamic", "Water", "Terrain", "TwoWheeler",
        "Bus", "Truck",
    )
    ignore_index = 255
    first_class_id = 1  # release id 0 = unlabeled -> ignore_index
    # CMNeXt's DELIVER palette.
    palette = (
        (70, 70, 70), (100, 40, 40), (55, 90, 80), (220, 20, 60), (153, 153, 153),
        (157, 234, 50), (128, 64, 128), (244, 35, 232), (107, 142, 35), (0, 0, 142),
        (102, 102, 156), (220, 220, 0), (70, 130, 180), (81, 0, 81), (150, 100, 100),
        (230, 150, 140), (180, 165, 180), (250, 170, 30), (110, 190, 160), (170, 120, 50),
        (45, 60, 150), (145, 170, 100), (0, 0, 230), (0, 60, 100), (0, 0, 70),
    )
    split_names = ("train", "val", "test")
    grey_sources = ("depth", "hha", "event", "lidar")

    def __init__(self, root: str | Path, modalities: Sequence[str] = ("depth", "event", "lidar")):
        super().__init__(root)
        self.modalities = (RGB, *select_modalities(modalities, ("depth", "hha", "event", "lidar"), self.name))

    def splits(self) -> list[str]:
        img = self.root / "img"
        return [s for s in self.split_names if any((img / c / s).is_dir() for c in CONDITIONS)]

    def records(self, split: str) -> list[Record]:
        records = []
        for condition in CONDITIONS:
            split_dir = self.root / "img" / condition / split
            for rgb in sorted(split_dir.glob("*/*_rgb_front.png")) if split_dir.is_dir() else ():
                frame = rgb.name[: -len("_rgb_front.png")]
                records.append(self._record(split, condition, rgb.parent.name, frame))
        return sorted_records(records)

    def _record(self, split: str, condition: str, sequence: str, frame: str) -> Record:
        files = {}
        for source in (*self.modalities, LABEL):
            folder, tag = _LAYOUT[source]
            path = self.root / folder / condition / split / sequence / f"{frame}_{tag}_front.png"
            if path.is_file():
                files[source] = path
        case = next((c for c in CASES if c in sequence), None)
        meta = {"split": split, "condition": condition, "sequence": sequence, "frame": frame, "case": case}
        return Record(key=sample_key(split, condition, sequence, frame), files=files, meta=meta)

    def decode(self, record: Record, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        arrays = super().decode(record, meta)
        depth = arrays.get("depth")
        if depth is not None:
            carla = depth.ndim == 3 and depth.dtype == np.uint8
            arrays["depth"] = decode_carla_depth(depth) if carla else depth
            meta["depth_encoding"] = "carla_rgb24_to_metres" if carla else "as_stored"
        event, rgb = arrays.get("event"), arrays.get(RGB)
        if event is not None and rgb is not None and event.shape[:2] != rgb.shape[:2]:
            meta["event_size"] = list(event.shape[:2])
            arrays["event"] = resize_nearest(event, rgb.shape[:2])
        return arrays


def resize_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (H, W), per channel so any dtype and channel count work."""
    height, width = size
    if image.ndim == 2:
        return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.NEAREST))
    return np.stack([resize_nearest(image[..., c], size) for c in range(image.shape[2])], axis=2)
