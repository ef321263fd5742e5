"""The DVC DAG end to end, in a fresh git copy of the project, at the `smoke` preset's sizes:
`dvc repro` runs demo -> shards -> the demo foundation model -> PSST -> modality LoRAs and their
probes -> finetune/evaluate per task -> report, a second `dvc repro` has nothing to do, and
`dvc exp run -S` applies Hydra overrides: changing one task re-runs only that task, adding a
task re-runs no Stage-1 stage, and changing one Stage-1 run retrains no other LoRA."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from tests.conftest import REPO

TASKS = ("rgbt_seg", "rgb_seg", "rgbd_seg", "rgbtd_seg", "rgbt_sod")
STAGE1 = ("psst_warmup", "psst_select", "psst_joint", "export_lora", "probe_lora")



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
    text = text.replace("  - experiment: null", "  - experiment: smoke")
    config.write_text(text)
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
    foundation = json.loads((project / "metrics/foundation/demo_hiera/train.json").read_text())
    assert foundation["trained"] and foundation["corpus"]["train_images"] == 8
    assert json.loads((project / "data/foundation/index.json").read_text())["foundations"]["demo_hiera"]
    for modality in ("thermal", "depth"):
        warmup = json.loads((project / f"metrics/psst/{modality}/warmup.json").read_text())
        assert warmup["trained"] and not warmup["is_random_init"]
        assert warmup["weights_description"] == "demo foundation model (synthetic RGB)"
        assert (project / f"metrics/psst/{modality}/score_histogram.csv").is_file()
        lora = project / "data" / "lora" / "default" / modality
        provenance = json.loads((lora / "xmodal.json").read_text())
        assert provenance["modality"]["name"] == modality and provenance["psst"]["mode"] == "full"
        assert sorted(p.name for p in lora.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "xmodal.json"]
        probe = json.loads((project / f"metrics/psst/{modality}/probe.json").read_text())
        assert probe["probed"] and set(probe["summary"]) == {"rgb", "foundation", "warmup", "lora"}
    import timm

    encoder = provenance["backbone"]
    PeftModel.from_pretrained(timm.create_model(encoder["backbone"], **encoder["model_args"]), str(lora))

    status = run(project, *dvc, "status")
    assert "up to date" in status
    again = run(project, *dvc, "repro")
    assert "didn't change, skipping" in again and "Running stage" not in again

    for task in TASKS:
        evaluation = json.loads((project / f"metrics/tasks/{task}/eval.json").read_text())
        assert evaluation["protocol"]["split"] == "test" and set(evaluation["groups"]) == {"day", "dusk", "night"}
        assert (project / f"data/tasks/{task}/model/seed0/task.json").is_file()
    assert evaluation["head"] == "sod" and "s_measure" in evaluation["overall"]
    report = (project / "reports" / "README.md").read_text()
    assert all(f"| {task} |" in report for task in TASKS)
    assert "Encoder: demo foundation model (synthetic RGB)" in report and "random-initialised" not in report
    for section in ("What the demo shows", "Stage 1 diagnostics", "Foundation models",
                    "Efficiency at the seed paper's scale"):
        assert f"## {section}" in report, section
    shown = json.loads(run(project, *dvc, "metrics", "show", "--json"))
    listed = json.dumps(shown)
    assert all(f"metrics/tasks/{task}/eval.json" in listed for task in TASKS)

    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "demo outputs")
    ran = run(project, *dvc, "exp", "run", "-S", "tasks.rgbt_seg.label_fraction=0.5", "-n", "half-labels")
    assert stages_run(ran) == {"finetune@rgbt_seg", "evaluate@rgbt_seg", "report"}  # only that task
    train = json.loads((project / "metrics/tasks/rgbt_seg/train.json").read_text())
    assert train["labeled_images"] == 3 and train["label_fraction"] == 0.5

    ran = run(project, *dvc, "exp", "run", "-S", "+task@tasks.extra=demo_rgbt_seg", "-n", "fifth-task")
    assert stages_run(ran) == {"finetune@extra", "evaluate@extra", "report"}  # Stage 1 reused
    assert "| extra |" in (project / "reports" / "README.md").read_text()

    ran = run(project, *dvc, "exp", "run", "-S", "loras.thermal.psst.mode=mae", "-n", "thermal-mae")
    stage1 = {s for s in stages_run(ran) if s.split("@")[0] in STAGE1}
    assert stage1 == {f"{s}@thermal" for s in STAGE1}  # the depth LoRA is not retrained
    provenance = json.loads((project / "data/lora/default/thermal/xmodal.json").read_text())
    assert provenance["psst"]["mode"] == "mae"

    shown = json.loads(run(project, *dvc, "exp", "show", "--json"))
    experiments = {exp.get("name"): exp for rev in shown for exp in (rev.get("experiments") or [])}
    assert {"half-labels", "fifth-task", "thermal-mae"} <= set(experiments), shown
    data = experiments["half-labels"]["revs"][0]["data"]
    params = data["params"]["params.yaml"]["data"]
    assert params["tasks"]["rgbt_seg"]["label_fraction"] == 0.5 and params["demo"]["num_train"] == 6  # Hydra kept the rest
    assert "metrics/tasks/rgbt_seg/eval.json" in data["metrics"]


def stages_run(output: str) -> set[str]:
    """Stages DVC actually ran (not those restored from its run-cache)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_a_training_stage_under_torchrun_writes_from_rank_zero_only(project, tmp_path):
    """The real finetune command launched as `launcher=torchrun` would launch it (2 gloo processes):
    it trains with world size 2 and only rank 0's folder and metrics appear."""
    run(project, sys.executable, "-m", "dvc", "repro", "finetune@rgbt_seg")  # its inputs (no-op after the DAG)
    params = project / "params.yaml"
    single = params.read_text()
    try:
        run(project, sys.executable, "-m", "pipeline.cli", "compose", "trainer=ddp_cpu", "launcher=torchrun")
        run(project, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
            "-m", "stages.finetune", "rgbt_seg", "data/shards/demo", "data/lora/default", str(tmp_path / "model"),
            "--metrics", str(tmp_path / "train.json"))
    finally:
        params.write_text(single)
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch"] == 2 * metrics["per_device_batch"]
    assert json.loads((tmp_path / "model" / "summary.json").read_text())["metrics"] == metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "train.json"]  # no rank's folder left behind
