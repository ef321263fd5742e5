"""Sharding the team's real images (read-only, outside the repo): HIT-UAV thermal JPEGs and
RoadScene visible/infrared pairs, with the project's own dataset configs."""

from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset
from tests.conftest import REPO


def dataset_config(name: str, root) -> dict:
    config = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml"))
    return {**config, "root": str(root)}


@pytest.mark.slow
def test_hit_uav_thermal_pool(shared_data, tmp_path):
    reader = build_reader(dataset_config("hit_uav", shared_data / "hit_uav" / "images"))
    manifest = shard_dataset(reader, tmp_path / "hit_uav", name="hit_uav", workers=2, progress=False)
    assert manifest["splits"]["unlabeled"]["samples"] == 1200 and manifest["skipped"] == []
    thermal = manifest["modalities"]["thermal"]
    assert thermal["dtype"] == "uint8" and thermal["channels"] == 1
    assert thermal["height"] == [512, 512] and thermal["width"] == [640, 640]
    assert 0 <= thermal["percentiles"]["p1"] < thermal["percentiles"]["p99"] <= 255
    assert len(manifest["splits"]["unlabeled"]["shards"]) == 8


@pytest.mark.slow
def test_roadscene_pairs_of_varying_size(shared_data, tmp_path):
    reader = build_reader(dataset_config("roadscene", shared_data / "roadscene"))
    manifest = shard_dataset(reader, tmp_path / "roadscene", name="roadscene", workers=2, progress=False)
    assert manifest["splits"]["all"]["samples"] == 221
    # the release ships a Windows thumbnail cache among the images: listed, not silently dropped
    assert [(s["reason"], s["file"]) for s in manifest["skipped"]] == [("not_an_image", "visible/Thumbs.db")]
    assert manifest["modalities"]["rgb"]["channels"] == 3
    assert manifest["modalities"]["thermal"]["channels"] == 1
    assert manifest["modalities"]["thermal"]["height"][0] < manifest["modalities"]["thermal"]["height"][1]


def test_real_folder_with_truncated_mismatched_and_non_image_files(shared_data, tmp_path):
    source = shared_data / "roadscene"
    names = sorted(p.name for p in (source / "infrared").glob("*.jpg"))[:5]
    root = tmp_path / "roadscene_bad"
    for folder in ("visible", "infrared"):
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(source / folder / name, root / folder / name)
    truncated = root / "visible" / names[0]
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with Image.open(root / "infrared" / names[1]) as image:
        image.resize((image.width // 2, image.height // 2)).save(root / "infrared" / names[1])
    (root / "infrared" / "capture_log.csv").write_text("frame,temperature\n1,21.5\n")

    manifest = shard_dataset(build_reader(dataset_config("roadscene", root)), tmp_path / "out",
                             name="roadscene_bad", progress=False)
    assert manifest["splits"]["all"]["samples"] == 3
    assert sorted((s["reason"], s["file"]) for s in manifest["skipped"]) == [
        ("not_an_image", "infrared/capture_log.csv"),
        ("size_mismatch", f"visible/{names[1]}"),
        ("unreadable", f"visible/{names[0]}"),
    ]
    sizes = {s["message"] for s in manifest["skipped"] if s["reason"] == "size_mismatch"}
    assert any("thermal" in m and "rgb" in m for m in sizes)
    assert len(list((tmp_path / "out").glob("all-*.tar"))) == 3
