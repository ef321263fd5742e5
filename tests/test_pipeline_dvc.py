"""The DVC DAG end to end, in a fresh git copy of the project: `dvc repro` runs the demo and its
shards, a second `dvc repro` has nothing to do, and `dvc exp run -S` applies Hydra overrides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO

TINY_DEMO = {"image_size": [64, 64], "num_train": 6, "num_val": 3, "num_test": 3, "num_pool": 6}


def run(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's files as a fresh clone would have them (tracked + new, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    root = tmp_path_factory.mktemp("clone") / "xmodal"
    for name in listed:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    # `dvc exp run` recomposes params.yaml from conf/, so the tiny sizes go into conf/ itself
    config = OmegaConf.load(root / "conf" / "config.yaml")
    config.demo.update(TINY_DEMO)
    OmegaConf.save(config, root / "conf" / "config.yaml")
    run(root, "git", "init", "-q")
    run(root, sys.executable, "-m", "pipeline.cli", "compose")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "tiny demo")
    return root


@pytest.mark.slow
def test_repro_then_nothing_to_do_then_experiment(project):
    dvc = (sys.executable, "-m", "dvc")
    run(project, *dvc, "repro")
    manifest = json.loads((project / "data/shards/demo/manifest.json").read_text())
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 6, "val": 3, "test": 3}
    assert manifest["modalities"]["thermal"]["dtype"] == "uint16"
    assert manifest["class_names"][4] == "person"
    pool = json.loads((project / "data/shards/demo_thermal_pool/manifest.json").read_text())
    assert pool["splits"]["unlabeled"]["samples"] == 6

    status = run(project, *dvc, "status")
    assert "up to date" in status
    again = run(project, *dvc, "repro")
    assert "didn't change, skipping" in again and "Running stage" not in again

    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "demo outputs")
    run(project, *dvc, "exp", "run", "-S", "demo.seed=7", "-n", "seed7")
    shown = json.loads(run(project, *dvc, "exp", "show", "--json"))
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    names = {exp.get("name") for exp in experiments}
    assert "seed7" in names, shown
    seed7 = next(e for e in experiments if e.get("name") == "seed7")
    params = seed7["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["demo"]["seed"] == 7 and params["demo"]["num_train"] == 6  # Hydra kept the rest
