"""The demo foundation model: pretrained on the RGB-only corpus, saved as a checkpoint that the
ordinary `weights: checkpoint` path loads, with its description and architecture recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline.artifacts import PhaseOutputs, read_json
from pipeline.config import load_params
from pipeline.data.demo import generate_demo
from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset
from pipeline.models.backbone import compute_fingerprint, create_backbone
from pipeline.training.foundation import CHECKPOINT, INFO, run_foundation
from stages.foundation_index import main as write_index
from tests.conftest import smoke_params


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("foundation")
    generate_demo(tmp / "raw", image_size=(64, 64), num_train=0, num_val=0, num_test=0, num_pool=0,
                  foundation={"num_train": 8, "num_val": 3}, progress=False)
    reader = build_reader({"reader": "paired", "root": str(tmp / "raw" / "foundation"), "modalities": ["rgb"],
                           "classes_file": "../classes.json"})
    shard_dataset(reader, tmp / "shards", name="demo_foundation", min_shards_per_split=2, progress=False)
    return tmp / "shards"


def test_demo_backbone_takes_its_architecture_from_the_foundation():
    params = smoke_params()
    foundation = params["foundations"]["demo_hiera"]["backbone"]
    assert (params["backbone"]["name"], params["backbone"]["embed_dim"]) == (foundation["name"], foundation["embed_dim"])


@pytest.mark.slow
def test_pretrained_encoder_loads_through_the_checkpoint_path(corpus, tmp_path):
    params = smoke_params()
    run_dirs = {"checkpoints": tmp_path / "ckpt", "logs": tmp_path / "logs"}
    outputs = PhaseOutputs(tmp_path / "demo_hiera", tmp_path / "m" / "train.json", tmp_path / "m" / "loss.csv")
    metrics = run_foundation(params, "demo_hiera", corpus, outputs, run_dirs, progress=False)
    assert metrics["trained"] and metrics["steps"] == 2 and metrics["corpus"]["train_images"] == 8
    assert metrics["held_out"]["split"] == "val" and 0.0 <= metrics["held_out"]["overall"]["miou"] <= 1.0
    assert set(metrics["held_out"]["groups"]) <= {"day", "dusk", "night"}
    assert read_json(tmp_path / "demo_hiera" / INFO) == metrics == read_json(tmp_path / "m" / "train.json")

    path = tmp_path / "demo_hiera" / CHECKPOINT
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert metadata["description"] == "demo foundation model (synthetic RGB)"
    assert json.loads(metadata["architecture"]) == {"name": "sam2_hiera_tiny", "embed_dim": 48, "seed": 0}
    assert not any(k.startswith(("decoder", "fusion", "head")) for k in keys)  # the encoder only

    config = {**params["backbone"], "weights": "checkpoint", "checkpoint": str(path)}
    loaded = create_backbone(**config)
    assert loaded.weights_description == "demo foundation model (synthetic RGB)"
    assert loaded.is_random_init is False and loaded.model_args == {"embed_dim": 48}
    initial = create_backbone(**{**config, "weights": "random", "checkpoint": None})
    assert compute_fingerprint(loaded.model) != compute_fingerprint(initial.model)  # it was trained


def test_index_lists_the_foundations_and_exists_without_any(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for foundations in ({}, {"demo_hiera": {"description": "d", "backbone": {"name": "x"}, "dataset": "c"}}):
        (tmp_path / "params.yaml").write_text(json.dumps({"foundations": foundations}))
        write_index(Path("data/foundation/index.json"))
        index = read_json(Path("data/foundation/index.json"))["foundations"]
        assert sorted(index) == sorted(foundations)
    assert index["demo_hiera"]["checkpoint"] == "data/foundation/demo_hiera/model.safetensors"
    assert load_params()["foundations"]  # the stage read params.yaml of the working directory
