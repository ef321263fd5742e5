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
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import yaml
from peft import PeftModel

from tests.conftest import REPO

TASKS = ("rgbt_seg", "rgb_seg", "rgbd_seg", "rgbtd_seg", "rgbt_sod")
STAGE1 = ("psst_warmup", "psst_select", "psst_joint", "export_lora", "probe_lora")



def run_env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "DVC_NO_ANALYTICS": "1",
    }


def run(cwd: Path, *args: str, with_log: bool = False) -> str:
    """Run a command; fail with its output unless it exits 0; return its stdout (and its stderr,
    where Lightning and torchrun log, with `with_log`)."""
    result = subprocess.run(args, cwd=cwd, env=run_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr if with_log else result.stdout


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
@pytest.mark.parametrize("task", ["rgbt_seg", "rgbt_det"])
def test_a_training_stage_under_torchrun_writes_from_rank_zero_only(project, tmp_path, task):
    """The real finetune command launched as `launcher=torchrun` would launch it (2 gloo processes):
    it trains with world size 2 and only rank 0's folder and metrics appear (dense and FCOS heads)."""
    run(project, sys.executable, "-m", "dvc", "repro", f"finetune@{task}")  # its inputs (no-op after the DAG)
    params = project / "params.yaml"
    single = params.read_text()
    try:
        run(project, sys.executable, "-m", "pipeline.cli", "compose", "trainer=ddp_cpu", "launcher=torchrun")
        run(project, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
            "-m", "stages.finetune", task, "data/shards/demo", "data/lora/default", str(tmp_path / "model"),
            "--metrics", str(tmp_path / "train.json"))
    finally:
        params.write_text(single)
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch"] == 2 * metrics["per_device_batch"]
    assert json.loads((tmp_path / "model" / "summary.json").read_text())["metrics"] == metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "train.json"]  # no rank's folder left behind


@contextmanager
def composed(project: Path, *overrides: str) -> Iterator[None]:
    """params.yaml composed with `overrides` for the duration (stage commands run directly)."""
    params = project / "params.yaml"
    saved = params.read_text()
    try:
        run(project, sys.executable, "-m", "pipeline.cli", "compose", *overrides)
        yield
    finally:
        params.write_text(saved)


TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


def finetune_command(out: Path) -> tuple[str, ...]:
    return ("-m", "stages.finetune", "rgbt_seg", "data/shards/demo", "data/lora/default", str(out / "model"),
            "--metrics", str(out / "train.json"))


@pytest.mark.slow
def test_selection_and_evaluation_give_the_same_outputs_on_one_and_two_processes(project, tmp_path):
    """psst_select (torchrun) and evaluate (Lightning-launched, and torchrun) split the shards over
    2 ranks and gather: the same subset.json, metrics.json (times aside) and figure as 1 process."""
    run(project, sys.executable, "-m", "dvc", "repro", "finetune@rgbt_seg", "evaluate@rgbt_sod", "evaluate@rgbt_det",
        "psst_select@depth")
    dataset = yaml.safe_load((project / "params.yaml").read_text())["loras"]["depth"]["dataset"]
    select = ("-m", "stages.psst_select", "depth", f"data/shards/{dataset}", "data/psst/depth/warmup")
    evaluate = {task: ("-m", "stages.evaluate", task, "data/shards/demo", f"data/tasks/{task}/model")
                for task in ("rgbt_seg", "rgbt_sod", "rgbt_det")}
    for n in (1, 2):
        with composed(project, *(("trainer=ddp_cpu",) if n == 2 else ())):
            launch = (*TORCHRUN, f"--nproc_per_node={n}", "--master_port=29531") if n == 2 else (sys.executable,)
            run(project, *launch, *select, str(tmp_path / f"selection{n}"))
            run(project, sys.executable, *evaluate["rgbt_seg"], str(tmp_path / f"rgbt_seg{n}"))  # Lightning launches
            for task in ("rgbt_sod", "rgbt_det"):  # detection: boxes gathered over the ranks
                run(project, *launch, *evaluate[task], str(tmp_path / f"{task}{n}"))
    subsets = [json.loads((tmp_path / f"selection{n}" / "subset.json").read_text()) for n in (1, 2)]
    assert subsets[0]["scored"] and len(subsets[0]["scores"]) == 8
    assert subsets[0]["selected"] == subsets[1]["selected"]  # the same subset, in the same order
    # the scores to float precision: a rank's batch has another shape, so its sums round differently
    assert subsets[0]["scores"].keys() == subsets[1]["scores"].keys()
    assert all(v == pytest.approx(subsets[1]["scores"][k], rel=1e-5, abs=2e-8) for k, v in subsets[0]["scores"].items())

    def without_times(value):
        if isinstance(value, dict):
            return {k: without_times(v) for k, v in value.items() if k != "eval_seconds"}
        return round(value, 12) if isinstance(value, float) else value

    for task in evaluate:
        one, two = (json.loads((tmp_path / f"{task}{n}" / "metrics.json").read_text()) for n in (1, 2))
        assert one["overall"] and without_times(one) == without_times(two), task
        figures = [(tmp_path / f"{task}{n}" / "predictions.png").read_bytes() for n in (1, 2)]
        assert figures[0] == figures[1], task


@pytest.mark.slow
def test_a_training_stage_across_two_simulated_nodes(project, tmp_path):
    """Two `torchrun --nnodes=2` processes on localhost, node ranks 0 and 1 (as two machines would
    run it): world size 2 over 2 nodes, and only node 0 writes (node 1 is given other paths)."""
    run(project, sys.executable, "-m", "dvc", "repro", "finetune@rgbt_seg")  # its inputs (no-op after the DAG)
    with composed(project, "trainer=ddp_cpu", "trainer.devices=1", "+trainer.num_nodes=2"):
        nodes = [subprocess.Popen([*TORCHRUN, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                                   "--master_addr=127.0.0.1", "--master_port=29533",
                                   *finetune_command(tmp_path / f"node{rank}")], cwd=project, env=run_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    metrics = json.loads((tmp_path / "node0" / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["num_nodes"] == 2 and metrics["devices"] == {"cpu": [0, 1]}
    assert not [p for p in (tmp_path / "node1").rglob("*") if p.is_file()]  # node 1 wrote nothing


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in their own sessions)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(entry[5:]) for entry in environ if entry.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def start_and_kill_mid_run(project: Path, out: Path, victims: str) -> tuple[int, str]:
    """Start the finetune stage on 2 torchrun ranks, SIGKILL `victims` ("rank1": that worker;
    "job": torchrun and every worker) once a checkpoint exists; (exit code, output)."""
    checkpoint = project / "checkpoints" / "finetune" / "rgbt_seg" / "seed0" / "last.ckpt"
    job = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", "--master_port=29535", *finetune_command(out)],
                           cwd=project, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the run finished before it could be killed"
    workers = descendants(job.pid)
    if victims == "rank1":
        os.kill(next(pid for pid in workers if rank_of(pid) == 1), signal.SIGKILL)
    else:
        for pid in [job.pid, *workers]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = job.communicate(timeout=300)[0]
    return job.returncode, output


@pytest.mark.slow
def test_killed_ddp_stages_fail_keep_outputs_resume_and_start_afresh_when_done(project, tmp_path):
    """Under 2 torchrun ranks: a rank SIGKILLed mid-run fails the stage and keeps the previous
    output; the whole job SIGKILLed mid-run resumes on the re-run and completes, deleting its
    checkpoints; a re-run after completion trains from scratch."""
    run(project, sys.executable, "-m", "dvc", "repro", "finetune@rgbt_seg")  # its inputs (no-op after the DAG)
    shutil.rmtree(project / "checkpoints" / "finetune" / "rgbt_seg", ignore_errors=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "previous.txt").write_text("previous output")
    with composed(project, "trainer=ddp_cpu", "launcher=torchrun", "tasks.rgbt_seg.train.epochs=16",
                  "tasks.rgbt_seg.train.checkpoint_every_n_steps=1"):  # 16 steps of one batch per rank
        code, output = start_and_kill_mid_run(project, tmp_path, "rank1")
        assert code != 0, output
        assert (tmp_path / "model" / "previous.txt").read_text() == "previous output"
        assert not (tmp_path / "train.json").exists()

        code, output = start_and_kill_mid_run(project, tmp_path, "job")
        assert code != 0 and (project / "checkpoints" / "finetune" / "rgbt_seg" / "seed0" / "last.ckpt").is_file()
        resumed = run(project, *TORCHRUN, "--nproc_per_node=2", "--master_port=29537", *finetune_command(tmp_path),
                      with_log=True)
        assert "Restoring states from the checkpoint" in resumed
        metrics = json.loads((tmp_path / "train.json").read_text())
        assert metrics["world_size"] == 2 and metrics["steps"] == 16
        assert not list((project / "checkpoints" / "finetune" / "rgbt_seg").rglob("*.ckpt"))  # none kept

        again = run(project, *TORCHRUN, "--nproc_per_node=2", "--master_port=29539", *finetune_command(tmp_path),
                    with_log=True)
        assert "Restoring states" not in again and json.loads((tmp_path / "train.json").read_text())["steps"] == 16
