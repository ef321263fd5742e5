"""params.yaml stays the composition of conf/; overrides compose as `dvc exp run -S` does."""

from __future__ import annotations

import shutil

import pytest
import yaml

from pipeline.cli import main as xmodal
from pipeline.config import compose_params, load_params, section
from tests.conftest import REPO


def test_committed_params_equal_the_composition_of_conf():
    expected = compose_params(config_dir=REPO / "conf")
    actual = (REPO / "params.yaml").read_text()
    assert actual == expected, "params.yaml drifted from conf/: run `xmodal compose` and commit it"


def test_overrides_change_values_and_swap_groups():
    params = yaml.safe_load(compose_params(["demo.seed=3", "backbone=sam2_hiera_small"], REPO / "conf"))
    assert params["demo"]["seed"] == 3
    assert params["backbone"]["name"] == "sam2_hiera_small"
    added = yaml.safe_load(compose_params(["+dataset@datasets.hit_uav=hit_uav"], REPO / "conf"))
    assert added["datasets"]["hit_uav"]["reader"] == "folder"
    assert set(added["datasets"]) == set(params["datasets"]) | {"hit_uav"}


def test_conf_reads_nothing_from_the_runtime():
    # DVC resolves the composition once; env or hydra-runtime interpolations would freeze
    # whatever the composing machine had (design section 5).
    for path in (REPO / "conf").rglob("*.yaml"):
        text = path.read_text()
        assert "oc.env" not in text and "${hydra:" not in text, path


def test_compose_command_rewrites_params(tmp_path, monkeypatch):
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    xmodal(["compose", "demo.num_train=5"])
    assert load_params()["demo"]["num_train"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_section_errors_name_the_missing_key():
    params = {"datasets": {"demo": {"root": "x"}}}
    assert section(params, "datasets.demo.root") == "x"
    with pytest.raises(KeyError, match=r"'datasets.mfnet'.*have: \['demo'\]"):
        section(params, "datasets.mfnet")
