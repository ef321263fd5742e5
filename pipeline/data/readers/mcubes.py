"""MCubeS (Liang et al., CVPR 2022): multimodal material segmentation, 500 image sets of street
scenes at 1224x1024, 20 material classes.

Layout of the release (README and `dataloaders/datasets/multimodal_dataset.py` of
kyotovision-public/multimodal-material-segmentation; CMNeXt reads the same folders):

    <root>/polL_color/<name>.png      RGB (left polarisation camera)
    <root>/polL_aolp_sin/<name>.npy   sine of the angle of linear polarisation (float)
    <root>/polL_aolp_cos/<name>.npy   cosine of it
    <root>/polL_dolp/<name>.npy       degree of linear polarisation in [0, 1] (float)
    <root>/NIR_warped/<name>.png      near-infrared warped onto the RGB view
    <root>/GT/<name>.png              material ids 0..19, 255 = unlabeled (loss ignore_index)
    <root>/list_folder/{train,val,test}.txt   names such as `outscene1208_2_0000000150`

Output: `aolp` float32 radians in [0, pi), `dolp` float32 as stored, `nir` in its stored dtype.
AoLP has period pi, so the release stores it as a (sin, cos) pair; the official loaders never
decode it (they feed the pair to the network). `aolp_encoding: double` (default) reads the
pair as sin(2θ), cos(2θ), the usual polarimetric encoding, giving θ = atan2(s, c)/2 mod π;
`single` reads it as sin(θ), cos(θ), giving θ = atan2(s, c) mod π. Which one the release uses
is not documented; with `single` data all sines are >= 0, which is a quick way to check a copy.

Not applied (they are training choices of MCubeSNet, not facts of the data): cropping the
192 invalid leftmost columns and masking labels with `NIR_warped_mask/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.data.readers.base import (
    ReleaseReader,
    listed_records,
    read_split_names,
    register_reader,
    select_modalities,
)
from pipeline.data.types import LABEL, RGB, Record, SampleError

_FOLDERS = {
    RGB: "polL_color",
    "aolp_sin": "polL_aolp_sin",
    "aolp_cos": "polL_aolp_cos",
    "dolp": "polL_dolp",
    "nir": "NIR_warped",
    LABEL: "GT",
}
_SOURCES = {"aolp": ("aolp_sin", "aolp_cos"), "dolp": ("dolp",), "nir": ("nir",)}


def aolp_from_sin_cos(sin: np.ndarray, cos: np.ndarray, double_angle: bool = True) -> np.ndarray:
    """Angle of linear polarisation in [0, pi) as float32 from its stored sine/cosine pair."""
    angle = np.arctan2(sin.astype(np.float64), cos.astype(np.float64))
    if double_angle:
        angle = angle / 2
    angle = np.mod(angle, np.pi).astype(np.float32)
    angle[angle >= np.float32(np.pi)] = 0.0  # float32 rounding of values just below pi
    return angle


@register_reader("mcubes")
class MCubeSReader(ReleaseReader):
    """MCubeS's native layout; `modalities` picks among aolp, dolp and nir."""

    class_names = (
        "asphalt", "concrete", "metal", "road_marking", "fabric", "glass", "plaster", "plastic",
        "rubber", "sand", "gravel", "ceramic", "cobblestone", "brick", "grass", "wood", "leaf",
        "water", "human", "sky",
    )
    ignore_index = 255
    # CMNeXt's MCubeS palette.
    palette = (
        (44, 160, 44), (31, 119, 180), (255, 127, 14), (214, 39, 40), (140, 86, 75),
        (127, 127, 127), (188, 189, 34), (255, 152, 150), (23, 190, 207), (174, 199, 232),
        (196, 156, 148), (197, 176, 213), (247, 182, 210), (199, 199, 199), (219, 219, 141),
        (158, 218, 229), (57, 59, 121), (107, 110, 207), (156, 158, 222), (99, 121, 57),
    )
    split_names = ("train", "val", "test")

    def __init__(
        self,
        root: str | Path,
        modalities: Sequence[str] = ("aolp", "dolp", "nir"),
        aolp_encoding: Literal["double", "single"] = "double",
    ):
        super().__init__(root)
        if aolp_encoding not in ("double", "single"):
            raise ValueError(f"mcubes: aolp_encoding must be 'double' or 'single', not {aolp_encoding!r}")
        self.modalities = (RGB, *select_modalities(modalities, tuple(_SOURCES), self.name))
        self.double_angle = aolp_encoding == "double"

    def splits(self) -> list[str]:
        return list(self.split_names)

    def records(self, split: str) -> list[Record]:
        names = read_split_names(self.root / "list_folder" / f"{split}.txt")
        sources = [RGB, LABEL, *(s for m in self.modalities if m != RGB for s in _SOURCES[m])]
        return listed_records(split, names, {s: self.root / _FOLDERS[s] for s in sources})

    def decode(self, record: Record, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        raw = super().decode(record, meta)
        arrays = {k: raw[k] for k in (RGB, LABEL, "nir") if k in raw}
        if "dolp" in raw:
            arrays["dolp"] = _float_map(raw["dolp"], record.files["dolp"])
        if "aolp_sin" in raw and "aolp_cos" in raw:
            sin = _float_map(raw["aolp_sin"], record.files["aolp_sin"])
            cos = _float_map(raw["aolp_cos"], record.files["aolp_cos"])
            if sin.shape != cos.shape:
                path = record.files["aolp_sin"]
                message = f"{record.key}: AoLP sin {sin.shape} vs cos {cos.shape}"
                raise SampleError("size_mismatch", message, path)
            arrays["aolp"] = aolp_from_sin_cos(sin, cos, self.double_angle)
        return arrays


def _float_map(array: np.ndarray, path: Path) -> np.ndarray:
    """A single-channel float map as float32 (the .npy files hold float64 or float32)."""
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        message = f"{path}: expected a 2-D float array, got {array.dtype} {array.shape}"
        raise SampleError("unsupported", message, path)
    return array.astype(np.float32, copy=False)
