"""NYU Depth v2, labelled subset (Silberman et al., ECCV 2012): 1449 indoor RGB-D frames,
795 train / 654 test, 40-class labels of Gupta et al. (CVPR 2013).

The official release is one MATLAB v7.3 file; RGB-X segmentation works (SA-Gate, CMX, DFormer,
CMNeXt) distribute it as folders, which is what this reader reads:

    <root>/RGB/<name>.jpg      8-bit RGB
    <root>/Depth/<name>.png    depth (optional modality `depth`)
    <root>/HHA/<name>.jpg|png  HHA encoding of depth, 8-bit 3-channel (optional modality `hha`)
    <root>/Label/<name>.png    0 = unlabeled, 1..40 = NYUv2-40 classes
    <root>/train.txt, test.txt lines are `<name>` (CMX) or `RGB/<name>.jpg` (DFormer)

Label ids are shifted as all those loaders do (`gt - 1` on uint8): 0 -> 255 (ignore), k -> k-1.

Depth is passed through in the dtype and unit of the files, never rescaled: 16-bit PNGs
exported from the .mat as depth x 1000 are millimetres; DFormer's package stores 8-bit
normalised depth and SA-Gate's Depth2HHA pipeline depth x 10000 (0.1 mm). The folder layout
cannot tell these apart, so check your copy before comparing depth values across datasets.
CMNeXt's package has no Depth folder: use `modalities: [hha]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.data.readers.base import (
    ReleaseReader,
    listed_records,
    read_split_names,
    register_reader,
    select_modalities,
    voc_palette,
)
from pipeline.data.types import LABEL, RGB, Record

NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
_FOLDERS = {RGB: "RGB", "depth": "Depth", "hha": "HHA", LABEL: "Label"}


@register_reader("nyu_depth_v2")
class NYUDepthV2Reader(ReleaseReader):
    """The CMX/DFormer folder layout of NYUv2-40; `modalities` picks depth and/or hha."""

    class_names = NYU40_CLASSES
    ignore_index = 255
    first_class_id = 1  # release id 0 = unlabeled -> ignore_index
    palette = voc_palette(40)
    split_names = ("train", "test")

    def __init__(self, root: str | Path, modalities: Sequence[str] = ("depth",)):
        super().__init__(root)
        self.modalities = (RGB, *select_modalities(modalities, ("depth", "hha"), self.name))

    def splits(self) -> list[str]:
        return list(self.split_names)

    def records(self, split: str) -> list[Record]:
        names = read_split_names(self.root / f"{split}.txt")
        folders = {s: self.root / _FOLDERS[s] for s in (*self.modalities, LABEL)}
        return listed_records(split, names, folders)
