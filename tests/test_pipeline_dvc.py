"""The DVC DAG end to end, in a fresh git copy of the project, at the `smoke` preset's sizes:
`dvc repro` runs demo -> shards -> PSST -> modality LoRAs, a second `dvc repro` has nothing to
do, and `dvc exp run -S` applies Hydra overrides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from tests.conftest import REPO



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
    # `dvc exp run` recomposes params.yaml from conf/, so the preset goes into conf/ itself
    config = root / "conf" / "config.yaml"
    text = config.read_text()
    assert "  - experiment: null" in text
    config.write_text(text.replace("  - experiment: null", "  - experiment: smoke"))
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
    assert pool["splits"]["unlabeled"]["samples"] == 8
    for modality in ("thermal", "depth"):
        warmup = json.loads((project / f"metrics/psst/{modality}/warmup.json").read_text())
        assert warmup["trained"] and warmup["is_random_init"]
        assert (project / f"metrics/psst/{modality}/score_histogram.csv").is_file()
        lora = project / "data" / "lora" / modality
        provenance = json.loads((lora / "xmodal.json").read_text())
        assert provenance["modality"]["name"] == modality and provenance["psst"]["mode"] == "full"
        assert sorted(p.name for p in lora.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "xmodal.json"]
    import timm

    PeftModel.from_pretrained(timm.create_model("sam2_hiera_tiny"), str(project / "data/lora/thermal"))

    status = run(project, *dvc, "status")
    assert "up to date" in status
    again = run(project, *dvc, "repro")
    assert "didn't change, skipping" in again and "Running stage" not in again

    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "demo outputs")
    ran = run(project, *dvc, "exp", "run", "-S", "psst.mode=mae", "-n", "mae-only")
    assert "psst_warmup@thermal" in ran and "Running stage 'demo'" not in ran  # Stage 1 only
    shown = json.loads(run(project, *dvc, "exp", "show", "--json"))
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    assert "mae-only" in {exp.get("name") for exp in experiments}, shown
    data = next(e for e in experiments if e.get("name") == "mae-only")["revs"][0]["data"]
    params = data["params"]["params.yaml"]["data"]
    assert params["psst"]["mode"] == "mae" and params["demo"]["num_train"] == 6  # Hydra kept the rest
    joint = data["metrics"]["metrics/psst/thermal/joint.json"]["data"]
    assert joint["trained"] is False and joint["mode"] == "mae"
