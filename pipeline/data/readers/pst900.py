"""PST900 (Shivakumar et al., ICRA 2020): RGB-thermal subterranean scenes, 1280x720.

Layout of the release (README and `toolkit/utilities.py` of ShreyasSkandanS/pst900_thermal_rgb):

    <root>/{train,test}/rgb/<name>.png          8-bit RGB
    <root>/{train,test}/thermal/<name>.png      8-bit, FLIR automatic gain control (what
                                                published RGB-T results use)
    <root>/{train,test}/thermal_raw/<name>.png  16-bit raw radiometric counts
    <root>/{train,test}/depth/<name>.png        16-bit stereo depth
    <root>/{train,test}/labels/<name>.png       class ids 0..4

File names are shared across folders (e.g. `31_bag1a_rect_rgb_frame0000000007.png`).

Thermal is projected into the RGB camera, so parallax leaves zero-valued holes; they are kept
as released. Depth is passed through as stored (uint16): the toolkit turns it into metres by
dividing by 2560 (`DEPTH_SCALING`), so it is NOT millimetres. Class 0 `background` is a real
class in PST900's mIoU; 255 is only used for out-of-range ids and padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.data.readers.base import (
    ReleaseReader,
    index_by_stem,
    listed_records,
    register_reader,
    select_modalities,
)
from pipeline.data.types import LABEL, RGB, Record


@register_reader("pst900")
class PST900Reader(ReleaseReader):
    """PST900's native layout. `modalities` picks among thermal and depth; `raw_thermal` reads
    the 16-bit `thermal_raw/` folder instead of the 8-bit AGC `thermal/` one."""

    class_names = ("background", "fire_extinguisher", "backpack", "hand_drill", "survivor")
    ignore_index = 255
    # The toolkit's colours are BGR (shown with cv2.imshow); these are the same colours as RGB.
    palette = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))
    split_names = ("train", "test")
    grey_sources = ("thermal",)  # 8-bit thermal may be saved as three equal channels

    def __init__(self, root: str | Path, modalities: Sequence[str] = ("thermal",), raw_thermal: bool = False):
        super().__init__(root)
        self.modalities = (RGB, *select_modalities(modalities, ("thermal", "depth"), self.name))
        self.raw_thermal = raw_thermal

    def splits(self) -> list[str]:
        return [s for s in self.split_names if (self.root / s).is_dir()]

    def records(self, split: str) -> list[Record]:
        split_root = self.root / split
        if not split_root.is_dir():
            raise FileNotFoundError(f"pst900: split folder {split_root} does not exist")
        folder_of = {"thermal": "thermal_raw" if self.raw_thermal else "thermal", "depth": "depth"}
        folders = {RGB: split_root / "rgb", LABEL: split_root / "labels"}
        folders |= {m: split_root / folder_of[m] for m in self.modalities if m != RGB}
        return listed_records(split, sorted(index_by_stem(split_root / "rgb")), folders)
