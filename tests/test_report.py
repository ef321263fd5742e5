"""The report stage on hand-made task outputs: tables, shared-LoRA accounting, CSVs, figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.report import fmt_bytes, fmt_params, fmt_score, write_report
from stages.report import main as stage_main

LORA_PARAMS = 300_000
LORA_WEIGHTS = b"\0" * (3 * 2**19)  # 1.50 MiB


def _seg_scores(miou: float, pixel_accuracy: float) -> dict[str, Any]:
    return {"miou": miou, "pixel_accuracy": pixel_accuracy, "mean_accuracy": miou + 0.05,
            "per_class_iou": {"car": miou, "bike": None}, "confusion_matrix": [[1, 0], [0, 1]],
            "miou_policy": "present in ground truth or prediction"}


def _task(root: Path, name: str, *, dataset: str, streams: list[str], head: str, method: str, random_init: bool,
          overall: dict[str, Any], groups: dict[str, dict[str, Any]], trainable: int, total: int,
          loras: list[str], predictions: bool = True) -> None:
    model, evaluation = root / name / "model", root / name / "eval"
    model.mkdir(parents=True)
    evaluation.mkdir()
    info = {
        "task": name,
        "config": {"streams": streams, "head": head, "method": method, "label_fraction": 1.0, "dataset": dataset},
        "method": {"name": method},
        "backbone": {"backbone": "sam2_hiera_tiny", "is_random_init": random_init, "weights_source": "test"},
        "modality_loras": {m: {"dir": f"data/lora/{m}", "sha256": "0" * 64} for m in loras},
        "classes": {"names": ["car", "bike"], "ignore_index": 255, "palette": [[0, 0, 0], [255, 0, 0]]},
        "metrics": {"train_seconds": 12.5, "steps": 30, "effective_batch": 8,
                    "parameters": {"trainable": trainable, "total": total}, "trainable_bytes": 4 * trainable,
                    "modality_lora_bytes": len(LORA_WEIGHTS) * len(loras), "peak_gpu_memory_mb": None,
                    "loss_start": 2.0, "loss_end": 0.5, "labeled_images": 96},
    }
    metrics = {"task": name, "method": method, "streams": streams, "head": head, "protocol": {"split": "test"},
               "overall": overall, "groups": groups, "is_random_init": random_init}
    (model / "task.json").write_text(json.dumps(info))
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    if predictions:
        Image.new("RGB", (40, 20), (10, 200, 30)).save(evaluation / "predictions.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    tasks, lora = root / "tasks", root / "lora"
    night = {"day": _seg_scores(0.45, 0.9), "dusk": _seg_scores(0.40, 0.88), "night": _seg_scores(0.38, 0.85)}
    _task(tasks, "seg_tpmome", dataset="mfnet", streams=["rgb", "thermal"], head="segmentation", method="tp_mome",
          random_init=True, overall=_seg_scores(0.413, 0.912), groups=night, trainable=1_350_000,
          total=40_000_000, loras=["thermal"])
    _task(tasks, "seg_lora", dataset="mfnet", streams=["rgb", "thermal"], head="segmentation", method="lora",
          random_init=False, overall=_seg_scores(0.372, 0.9),
          groups={"day": _seg_scores(0.41, 0.9), "dusk": _seg_scores(0.35, 0.9), "night": _seg_scores(0.301, 0.9)},
          trainable=800_000, total=40_000_000, loras=[])
    _task(tasks, "rgb_seg", dataset="mfnet", streams=["rgb"], head="segmentation", method="tp_mome",
          random_init=False, overall=_seg_scores(0.35, 0.89),
          groups={"day": _seg_scores(0.42, 0.9), "dusk": _seg_scores(0.33, 0.9), "night": _seg_scores(0.2, 0.8)},
          trainable=1_200_000, total=40_000_000, loras=[], predictions=False)
    sod = {"s_measure": 0.812, "weighted_f_measure": 0.7, "e_measure_adaptive": 0.85, "e_measure_mean": 0.84,
           "e_measure_max": 0.9, "f_measure_adaptive": 0.75, "f_measure_mean": 0.74, "f_measure_max": 0.8,
           "mae": 0.045, "images": 10}
    _task(tasks, "sod_tpmome", dataset="vt5000", streams=["rgb", "thermal"], head="sod", method="tp_mome",
          random_init=False, overall=sod, groups={}, trainable=1_100_000, total=40_000_000, loras=["thermal"])
    (tasks / "broken" / "model").mkdir(parents=True)
    (tasks / "broken" / "model" / "task.json").write_text("{}")
    for modality, params in (("thermal", LORA_PARAMS), ("depth", 123_000)):
        (lora / modality).mkdir(parents=True)
        (lora / modality / "adapter_model.safetensors").write_bytes(LORA_WEIGHTS)
        (lora / modality / "xmodal.json").write_text(json.dumps(
            {"lora": {"parameters": params, "rank": 8}, "psst": {"mode": "paired"}, "backbone": {},
             "modality": {"name": modality}}))
    return tasks, lora


@pytest.fixture(scope="module")
def report(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("out") / "reports"
    return out, write_report(*inputs, out)


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_formatting() -> None:
    assert (fmt_score(0.4129), fmt_score(None)) == ("41.3", "–")
    assert (fmt_params(1_350_000), fmt_params(12_300), fmt_params(160_000_000), fmt_params(512)) == \
        ("1.35M", "12.3k", "160M", "512")
    assert fmt_bytes(3 * 2**20) == "3.00 MiB"


def test_readme_tables(report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    text = (out / "README.md").read_text()
    assert text.splitlines()[2].startswith("> **Warning — random-initialised encoder: numbers show the pipeline works")
    assert "(tasks: seg_tpmome)" in text
    assert summary["random_init"] == ["seg_tpmome"]

    results = _section(text, "Results per task")
    header = "| task | dataset | streams | method | labels | mIoU | pixel acc | mIoU day | mIoU dusk | mIoU night |"
    assert header in results
    assert "| seg_tpmome | mfnet | rgb+thermal | tp_mome | 100% | 41.3 | 91.2 | 45.0 | 40.0 | 38.0 |" in results
    assert "| sod_tpmome | vt5000 | rgb+thermal | tp_mome | 100% | 81.2 | 4.5 |" in results

    methods = _section(text, "Method comparison")
    assert "### mfnet · rgb+thermal · segmentation · labels 100%" in methods
    assert "| lora | seg_lora | 37.2 | 41.0 | 35.0 | 30.1 | 800k |" in methods
    assert "| tp_mome | seg_tpmome | 41.3 | 45.0 | 40.0 | 38.0 | 1.35M |" in methods
    assert "vt5000" not in methods  # a single method is no comparison

    streams = _section(text, "Stream comparison")
    assert "### mfnet · segmentation · tp_mome · labels 100%" in streams
    assert "| rgb | rgb_seg | 35.0 | 42.0 | 33.0 | 20.0 | 1.20M |" in streams
    assert "| rgb+thermal | seg_tpmome | 41.3 | 45.0 | 40.0 | 38.0 | 1.35M |" in streams


def test_efficiency_counts_shared_lora_once(inputs: tuple[Path, Path], report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    efficiency = _section((out / "README.md").read_text(), "Efficiency")
    lora_bytes = sum(f.stat().st_size for f in (inputs[1] / "thermal").iterdir())  # weights + xmodal.json
    task_params = 1_350_000 + 800_000 + 1_200_000 + 1_100_000
    assert summary["cumulative"]["params"] == task_params + LORA_PARAMS  # thermal reused by two tasks, counted once
    assert summary["cumulative"]["full_finetune_params"] == 4 * 40_000_000
    assert summary["cumulative"]["bytes"] == 4 * task_params + lora_bytes
    assert summary["cumulative"]["lora_bytes"] == lora_bytes
    assert summary["cumulative"]["modality_loras"] == ["thermal"]  # depth exists but no task uses it
    assert "thermal 300k" in efficiency
    assert "= **4.75M parameters" in efficiency and "vs. 160M parameters" in efficiency and "(3.0%)" in efficiency
    assert "| seg_tpmome | tp_mome | 1.35M | 40.0M | 5.15 MiB | thermal (1.50 MiB) | 12.5 | n/a (CPU) |" in efficiency
    assert "| depth | 8 | 123k |" in efficiency and efficiency.split("| depth |")[1].split("\n")[0].endswith("| – |")


def test_csv_rows_match_inputs(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    with (out / "metrics.csv").open() as handle:
        rows = {row["task"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["rgb_seg", "seg_lora", "seg_tpmome", "sod_tpmome"]
    seg, sod = rows["seg_tpmome"], rows["sod_tpmome"]
    assert (seg["streams"], seg["head"], seg["method"], seg["is_random_init"]) == ("rgb+thermal", "segmentation",
                                                                                  "tp_mome", "True")
    assert float(seg["overall.miou"]) == 0.413 and float(seg["groups.night.miou"]) == 0.38
    assert float(seg["overall.per_class_iou.car"]) == 0.413 and seg["overall.per_class_iou.bike"] == ""
    assert "overall.confusion_matrix" not in seg and "overall.miou_policy" not in seg
    assert float(sod["overall.s_measure"]) == 0.812 and float(sod["overall.mae"]) == 0.045
    assert sod["overall.miou"] == "" and seg["overall.s_measure"] == ""
    with (out / "efficiency.csv").open() as handle:
        efficiency = {row["task"]: row for row in csv.DictReader(handle)}
    assert int(efficiency["seg_lora"]["trainable_params"]) == 800_000
    assert int(efficiency["seg_tpmome"]["modality_lora_bytes"]) == len(LORA_WEIGHTS)
    assert efficiency["seg_tpmome"]["modality_loras"] == "thermal" and efficiency["seg_lora"]["modality_loras"] == ""
    assert efficiency["rgb_seg"]["peak_gpu_memory_mb"] == ""


def test_figures_are_pngs(report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    expected = ["main_metric.png", "methods.png", "predictions_seg_lora.png", "predictions_seg_tpmome.png",
                "predictions_sod_tpmome.png"]
    assert sorted(summary["figures"]) == expected
    assert sorted(p.name for p in out.glob("*.png")) == expected  # rgb_seg has no predictions grid
    for name in expected:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 0
            image.verify()
    with Image.open(out / "main_metric.png") as image:
        assert image.width >= 600
    text = (out / "README.md").read_text()
    assert "![main_metric.png](main_metric.png)" in text and "(predictions_sod_tpmome.png)" in text


def test_incomplete_task_is_listed(report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    assert summary["incomplete"] == {"broken": "missing eval/metrics.json"}
    assert "Incomplete, not reported: `broken` (missing eval/metrics.json)" in (out / "README.md").read_text()


def test_rerun_replaces_the_folder(inputs: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    tasks, lora = inputs
    out = tmp_path / "reports"
    write_report(tasks, lora, out)
    (out / "stale.txt").write_text("from an older run")
    only = tmp_path / "tasks"
    only.mkdir()
    (only / "sod_tpmome").symlink_to(tasks / "sod_tpmome", target_is_directory=True)
    stage_main(only, lora, out)
    assert "report: 1 task(s), 2 figure(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "efficiency.csv", "main_metric.png", "metrics.csv",
                                                     "predictions_sod_tpmome.png"]
    assert "Warning" not in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_tasks_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="finetune and evaluate"):
        write_report(tmp_path / "nothing", tmp_path / "lora", tmp_path / "reports")
