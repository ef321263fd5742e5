"""Every conf/dataset/*.yaml of a public release names a registered reader and only options
that reader accepts. (The generic demo, HIT-UAV, RoadScene and real thermal pool configs are built
against real folders in tests/test_shard_real_data.py, tests/readers/test_box_readers.py and
tests/test_pipeline_dvc.py.)"""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.data.readers import build_reader

CONFIGS = [
    path
    for path in sorted((Path(__file__).parents[2] / "conf" / "dataset").glob("*.yaml"))
    if OmegaConf.load(path).reader not in ("paired", "folder", "union")
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dataset_config_builds_its_reader(path, tmp_path):
    config = OmegaConf.to_container(OmegaConf.load(path))
    assert config["root"] == f"data/raw/{path.stem}"
    reader = build_reader({**config, "root": str(tmp_path)}, where=f"dataset {path.stem}")
    assert reader.name == config["reader"]
    assert reader.class_names and reader.palette and len(reader.palette) == len(reader.class_names)


def test_every_native_reader_has_a_config():
    assert {p.stem for p in CONFIGS} >= {
        "mfnet", "pst900", "nyu_depth_v2", "sun_rgbd", "mcubes", "deliver", "vt821", "vt1000", "vt5000",
    }
