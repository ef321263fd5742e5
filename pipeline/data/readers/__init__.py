"""Dataset readers, one module per native layout; importing this package registers them all."""

from pipeline.data.readers import (  # noqa: F401  (each import registers its readers)
    deliver,
    generic,
    mcubes,
    mfnet,
    nyu_depth_v2,
    pst900,
    rgbt_sod,
    sun_rgbd,
    voc,
    yolo,
)
from pipeline.data.readers.base import READERS, DatasetReader, build_reader, register_reader

__all__ = ["READERS", "DatasetReader", "build_reader", "register_reader"]
