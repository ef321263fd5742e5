"""The report stage on hand-made stage outputs: tables (per task, PSST ablation in the paper's
layout, label efficiency, comparisons), Stage-1 diagnostics, shared-LoRA accounting, the
paper-scale counts, the generated findings, CSVs and figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.report import InDag, fmt_bytes, fmt_paired, fmt_params, fmt_score, write_report
from stages.report import main as stage_main

LORA_PARAMS = 300_000
LORA_WEIGHTS = b"\0" * (3 * 2**19)  # 1.50 MiB
DEMO = "demo foundation model (synthetic RGB)"


def _seg_scores(miou: float, pixel_accuracy: float = 0.9) -> dict[str, Any]:
    return {"miou": miou, "pixel_accuracy": pixel_accuracy, "mean_accuracy": miou + 0.05,
            "per_class_iou": {"car": miou, "bike": None}, "confusion_matrix": [[1, 0], [0, 1]],
            "miou_policy": "present in ground truth or prediction"}


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _task(root: Path, name: str, *, dataset: str = "mfnet", streams: list[str], head: str = "segmentation",
          method: str = "tp_mome", random_init: bool = False, runs: list[float], night: list[float] | None = None,
          trainable: int = 1_000_000, total: int = 40_000_000, loras: dict[str, str] | None = None,
          fraction: float = 1.0, predictions: bool = True, second: float = 0.9) -> None:
    """A task with one evaluation per entry of `runs` (main metric per seed), aggregated as the
    evaluate stage does."""
    key = {"segmentation": "miou", "sod": "s_measure", "detection": "map_50"}[head]
    loras = loras or {}
    seeds = list(range(len(runs)))
    night = night or [r - 0.1 for r in runs]
    backbone = {"backbone": "sam2_hiera_tiny", "is_random_init": random_init, "weights_source": "test",
                "weights_description": "random initialisation" if random_init else DEMO}
    train = {"train_seconds": 12.5, "steps": 30, "effective_batch": 8, "parameters": {"trainable": trainable,
             "total": total}, "trainable_bytes": 4 * trainable, "modality_lora_bytes": len(LORA_WEIGHTS) * len(loras),
             "peak_gpu_memory_mb": None, "loss_start": 2.0, "loss_end": 0.5, "labeled_images": 96}
    _write(root / name / "model" / "summary.json", {
        "task": name, "seeds": seeds, "backbone": backbone, "metrics": train,
        "config": {"streams": streams, "head": head, "method": method, "label_fraction": fraction,
                   "dataset": dataset, "lora_set": "x"},
        "modality_loras": {s: {"dir": f"data/lora/{mode}/{s}", "sha256": "0" * 64, "psst_mode": mode}
                           for s, mode in loras.items()}})

    def scores(value: float) -> dict[str, Any]:
        if head == "detection":
            return {"map_50": value, "map": second, "per_class_ap": {"person": value, "car": None}}
        return _seg_scores(value, second) if head == "segmentation" else {"s_measure": value, "mae": 0.045}

    std = (lambda v: float(np.std(v, ddof=1))) if len(runs) > 1 else (lambda v: 0.0)
    metrics = {"task": name, "head": head, "protocol": {"split": "test"}, "seeds": seeds,
               "overall": {**scores(float(np.mean(runs))), key: float(np.mean(runs))},
               "overall_std": {key: std(runs)},
               "groups": {"night": {key: float(np.mean(night))}} if head != "sod" else {},
               "groups_std": {"night": {key: std(night)}} if head != "sod" else {},
               "runs": {str(s): {"overall": {key: r}} for s, r in zip(seeds, runs)}, "is_random_init": random_init}
    _write(root / name / "eval" / "metrics.json", metrics)
    if predictions:
        Image.new("RGB", (40, 20), (10, 200, 30)).save(root / name / "eval" / "predictions.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    tasks, lora, psst, foundation = root / "tasks", root / "lora", root / "psst", root / "foundation"
    rgbt, rgbd = ["rgb", "thermal"], ["rgb", "depth"]
    # the default suite: tp_mome with PSST, a baseline, the RGB-only task, an SOD task
    _task(tasks, "seg_tpmome", streams=rgbt, random_init=True, runs=[0.413], night=[0.38], trainable=1_350_000,
          loras={"thermal": "full"})
    _task(tasks, "seg_lora", streams=rgbt, method="lora", runs=[0.372], night=[0.301], trainable=800_000)
    _task(tasks, "rgb_seg", streams=["rgb"], runs=[0.35], night=[0.2], trainable=1_200_000, predictions=False)
    _task(tasks, "sod_tpmome", dataset="vt5000", streams=rgbt, head="sod", runs=[0.812], trainable=1_100_000,
          loras={"thermal": "full"})
    # detection on MSRS: RGB + thermal with and without PSST, the RGB-only twin, a baseline method
    _task(tasks, "det_tpmome", dataset="msrs", streams=rgbt, head="detection", runs=[0.61], night=[0.55],
          second=0.31, trainable=2_000_000, loras={"thermal": "full"})
    _task(tasks, "det_rgb", dataset="msrs", streams=["rgb"], head="detection", runs=[0.42], night=[0.21],
          second=0.2, trainable=1_900_000)
    _task(tasks, "det_freeze", dataset="msrs", streams=rgbt, head="detection", method="freeze", runs=[0.5],
          night=[0.45], second=0.25, trainable=1_500_000)
    # a PSST ablation over three seeds (two segmentation tasks and an SOD task) at 10% labels
    ablation = {"none": ([0.30, 0.32, 0.31], [0.40, 0.41, 0.42]), "mae": ([0.33, 0.35, 0.34], [0.41, 0.43, 0.42]),
                "full": ([0.36, 0.38, 0.40], [0.45, 0.44, 0.46])}
    for mode, (thermal, depth) in ablation.items():
        _task(tasks, f"abl_{mode}_t", dataset="demo", streams=rgbt, runs=thermal, fraction=0.1,
              loras={"thermal": mode})
        _task(tasks, f"abl_{mode}_d", dataset="demo", streams=rgbd, runs=depth, fraction=0.1,
              loras={"depth": mode})
        _task(tasks, f"abl_{mode}_sod", dataset="demo", streams=rgbt, head="sod", runs=[0.7, 0.72, 0.71],
              fraction=0.1, loras={"thermal": mode})
    # label efficiency: tp_mome with and without PSST, and a baseline, at two fractions
    for fraction, values in ((0.05, (0.20, 0.15, 0.10)), (1.0, (0.50, 0.48, 0.47))):
        for (name, method, mode), value in zip((("le_full", "tp_mome", "full"), ("le_none", "tp_mome", "none"),
                                                 ("le_freeze", "freeze", None)), values):
            _task(tasks, f"{name}_{fraction:g}", dataset="eff", streams=rgbt, method=method,
                  runs=[value, value + 0.02], fraction=fraction, loras={"thermal": mode} if mode else None)
    (tasks / "broken" / "model").mkdir(parents=True)
    (tasks / "broken" / "model" / "summary.json").write_text("{}")
    for key, params in (("full/thermal", LORA_PARAMS), ("full/depth", 123_000)):
        folder = lora / key
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(LORA_WEIGHTS)
        _write(folder / "xmodal.json", {"lora": {"parameters": params, "rank": 8}, "psst": {"mode": "full"},
                                        "backbone": {}, "modality": {"name": key.split("/")[1]},
                                        "lora_update": {"stage1": 0.1, "stage2": 0.05, "all": 0.07},
                                        "losses": {"warmup": {"probe_loss_mae_before": 1.2,
                                                              "probe_loss_mae_after": 1.0},
                                                   "joint": {"probe_loss_mae_after": 0.9}}})

    def variant(miou: float) -> dict[str, Any]:
        return {"miou": miou, "pixel_accuracy": 0.8, "miou_night": miou - 0.1}

    _write(psst / "thermal_full" / "probe" / "metrics.json", {
        "lora": "thermal_full", "modality": "thermal", "mode": "full", "probed": True, "lora_gain_miou": 0.05,
        "summary": {"rgb": variant(0.6), "foundation": variant(0.3), "warmup": variant(0.33), "lora": variant(0.35)}})
    _write(psst / "hit_uav" / "probe" / "metrics.json", {"lora": "hit_uav", "modality": "thermal", "mode": "full",
                                                          "probed": False, "reason": "no labels"})
    _write(foundation / "demo_hiera" / "foundation.json", {
        "description": DEMO, "architecture": {"name": "sam2_hiera_tiny", "embed_dim": 48}, "parameters": 6_730_000,
        "corpus": {"train_images": 1536}, "train_seconds": 200.0, "steps": 384,
        "held_out": {"overall": {"miou": 0.57}, "groups": {"day": {"miou": 0.6}, "night": {"miou": 0.5}}}})
    scale = root / "paper_scale.json"
    _write(scale, {"backbone": "sam2_hiera_base_plus", "method": "tp_mome", "lora": {"rank": 32, "targets": ["qkv"]},
                   "encoder_parameters": 68_675_712, "modality_loras": {"thermal": 1_351_168},
                   "tasks": {"mfnet": {"streams": ["rgb", "thermal"], "classes": 9, "trainable": 3_877_805}},
                   "task_trainable": 3_877_805, "trainable": 5_228_973, "total": 73_904_685,
                   "reported": {"seed paper": {"total": 121.4, "trainable": 40.6}, "CMNeXt": {"total": 525.1}}})
    return {"tasks": tasks, "lora": lora, "psst": psst, "foundation": foundation, "scale": scale}


@pytest.fixture(scope="module")
def report(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("out") / "reports"
    return out, write_report(inputs["tasks"], inputs["lora"], out, psst_dir=inputs["psst"],
                             foundation_dir=inputs["foundation"], paper_scale=inputs["scale"])


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_formatting() -> None:
    assert (fmt_score(0.4129), fmt_score(None), fmt_score(0.4129, 0.0123)) == ("41.3", "–", "41.3 ± 1.2")
    assert (fmt_params(1_350_000), fmt_params(12_300), fmt_params(160_000_000), fmt_params(512)) == \
        ("1.35M", "12.3k", "160M", "512")
    assert fmt_bytes(3 * 2**20) == "3.00 MiB"
    assert fmt_paired([0.01, -0.02, 0.04]) == "+1.0 ± 3.0 (seeds disagree)"
    assert (fmt_paired([-0.01, -0.03]), fmt_paired([0.02])) == ("-2.0 ± 1.4 (every seed agrees)", "–")


def test_readme_tables(report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    text = (out / "README.md").read_text()
    assert text.splitlines()[2].startswith("> **Warning — random-initialised encoder: numbers show the pipeline works")
    assert "(tasks: seg_tpmome)" in text and summary["random_init"] == ["seg_tpmome"]
    assert f"> **Encoder: {DEMO}** — pretrained by this DAG on synthetic images" in text

    results = _section(text, "Results per task")
    header = "| task | dataset | streams | method | PSST | labels | seeds | mIoU | pixel acc | mIoU night |"
    assert header in results
    assert "| seg_tpmome | mfnet | rgb+thermal | tp_mome | full | 100% | 1 | 41.3 | 90.0 | 38.0 |" in results
    assert "| seg_lora | mfnet | rgb+thermal | lora | – | 100% | 1 | 37.2 | 90.0 | 30.1 |" in results
    std = 100 * np.std([0.36, 0.38, 0.40], ddof=1)
    assert f"| abl_full_t | demo | rgb+thermal | tp_mome | full | 10% | 3 | 38.0 ± {std:.1f} |" in results
    assert "| sod_tpmome | vt5000 | rgb+thermal | tp_mome | full | 100% | 1 | 81.2 | 4.5 |" in results
    detection = results.split("### detection\n", 1)[1].split("\n### ", 1)[0]
    assert "| task | dataset | streams | method | PSST | labels | seeds | mAP@50 | mAP | mAP@50 night |" in detection
    assert "| det_tpmome | msrs | rgb+thermal | tp_mome | full | 100% | 1 | 61.0 | 31.0 | 55.0 |" in detection

    methods = _section(text, "Method comparison")
    assert "### mfnet · rgb+thermal · segmentation · 100%" in methods
    assert "| lora | seg_lora | – | 37.2 | 30.1 | 800k |" in methods
    assert "| tp_mome | seg_tpmome | full | 41.3 | 38.0 | 1.35M |" in methods
    assert "vt5000" not in methods  # a single method is no comparison
    assert "### msrs · rgb+thermal · detection · 100%" in methods
    assert "| freeze | det_freeze | – | 50.0 | 45.0 | 1.50M |" in methods

    streams = _section(text, "Stream comparison")  # within one LoRA set: the RGB-only task meets the fused one
    assert "### mfnet · segmentation · tp_mome · x · 100%" in streams
    assert "| rgb | rgb_seg | – | 35.0 | 20.0 | 1.20M |" in streams
    assert "| rgb+thermal | seg_tpmome | full | 41.3 | 38.0 | 1.35M |" in streams
    assert "### msrs · detection · tp_mome · x · 100%" in streams  # day/night detection, RGB vs RGB + thermal
    assert "| rgb | det_rgb | – | 42.0 | 21.0 | 1.90M |" in streams


def test_psst_ablation_in_the_papers_layout(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    section = _section((out / "README.md").read_text(), "PSST ablation")
    assert "### tp_mome · eff · labels 5%" in section  # label-efficiency tasks with and without PSST
    ablation = section.split("### tp_mome · demo · labels 10%\n", 1)[1].split("\n### ", 1)[0]
    assert "| configuration | rgb+depth mIoU | rgb+thermal mIoU | rgb+thermal S-measure | Avg mIoU |" in ablation
    lines = [line for line in ablation.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in lines] == ["| Stage 2 only (`none`)", "| + MAE (`mae`)",
                                                         "| Full (error-weighted PSST) (`full`)"]
    # Avg: per seed the mean over the mIoU columns, then mean ± std over seeds
    per_seed = [(t + d) / 2 for t, d in zip([0.36, 0.38, 0.40], [0.45, 0.44, 0.46])]
    assert lines[2].endswith(f"| {fmt_score(np.mean(per_seed), np.std(per_seed, ddof=1))} | +5.5 ± 1.0 "
                             "(every seed agrees) |")
    # Δ Avg pairs each seed with the same seed of Stage 2 only: (0.37, 0.39, 0.38) - (0.35, 0.365, 0.365)
    assert lines[0].endswith("| – |") and lines[1].endswith("| +2.0 ± 0.5 (every seed agrees) |")
    assert "mfnet" not in section  # one PSST mode only: no ablation


def test_label_efficiency_table_figure_and_findings(report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    text = (out / "README.md").read_text()
    efficiency = _section(text, "Label efficiency")
    assert "### eff · rgb+thermal · segmentation: mIoU" in efficiency
    assert "| method | 5% | 100% |" in efficiency
    spread = 100 * np.std([0.2, 0.22], ddof=1)
    assert f"| tp_mome · PSST full | 21.0 ± {spread:.1f} | 51.0 ± {spread:.1f} |" in efficiency
    assert "| freeze | 11.0 ±" in efficiency
    assert "label_efficiency.png" in summary["figures"]

    findings = _section(text, "What the demo shows")
    assert "Foundation model `demo_hiera`" in findings and "held-out RGB mIoU 57.0" in findings
    assert "reads 60.0 mIoU from RGB but 30.0 from thermal without a LoRA, and 35.0 with" in findings
    delta = 100 * (np.mean([(t + d) / 2 for t, d in zip([0.36, 0.38, 0.40], [0.45, 0.44, 0.46])])
                   - np.mean([(t + d) / 2 for t, d in zip([0.30, 0.32, 0.31], [0.40, 0.41, 0.42])]))
    assert f"Full (error-weighted PSST) vs Stage 2 only: average mIoU {delta:+.1f} (larger than the seed spread" in findings
    assert "paired by seed +5.5 ± 1.0 (every seed agrees))." in findings
    # per task, paired by seed: thermal (0.36, 0.38, 0.40) - (0.30, 0.32, 0.31); SOD the same in every row
    assert ("PSST ablation per task (tp_mome, 10% labels), Full (error-weighted PSST) vs Stage 2 only, paired by "
            "seed: rgb+depth mIoU +4.0 ± 1.0 (every seed agrees); rgb+thermal mIoU +7.0 ± 1.7 (every seed agrees); "
            "rgb+thermal S-measure +0.0 ± 0.0 (identical in every seed).") in findings
    assert "Labels, eff rgb+thermal segmentation at 5%: best tp_mome · PSST full" in findings
    assert ("Streams (tp_mome, 100% labels): rgb+thermal vs rgb: mIoU +6.3 (one seed: no spread measured); "
            "at night 38.0 vs 20.0.") in findings


def test_stage1_diagnostics_and_foundations(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    text = (out / "README.md").read_text()
    stage1 = _section(text, "Stage 1 diagnostics")
    assert "| thermal_full | thermal | full | 60.0 | 30.0 | 33.0 | 35.0 | +5.0 | 20.0 | 25.0 |" in stage1
    assert "hit_uav" not in stage1  # nothing probed there
    assert "| full/thermal | full | 0.1000 | 0.0500 | 0.0700 | 1.2000 | 0.9000 |" in stage1
    foundations = _section(text, "Foundation models")
    assert "| demo_hiera | demo foundation model (synthetic RGB) | name=sam2_hiera_tiny, embed_dim=48 | 6.73M |" \
           " 1536 | 200 | 57.0 | 60.0 | 50.0 |" in foundations


def test_efficiency_counts_shared_lora_once(inputs: dict[str, Path], report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    text = (out / "README.md").read_text()
    efficiency = _section(text, "Efficiency")
    totals = summary["cumulative"]
    lora_bytes = sum(f.stat().st_size for f in (inputs["lora"] / "full").rglob("*") if f.is_file())
    assert totals["modality_loras"] == ["full/depth", "full/thermal"]  # each used by several tasks, counted once
    assert totals["missing_loras"] == ["mae/depth", "mae/thermal", "none/depth", "none/thermal"]
    assert "Not found in the LoRA folder, not counted: mae/depth, mae/thermal" in efficiency
    assert totals["lora_bytes"] == lora_bytes
    assert totals["params"] == totals["task_trainable_params"] + LORA_PARAMS + 123_000
    assert "| seg_tpmome | tp_mome | 1.35M | 40.0M | 5.15 MiB | full/thermal (1.50 MiB) | 12.5 | n/a (CPU) |" \
        in efficiency
    assert "| full/depth | 8 | 123k |" in efficiency
    assert efficiency.split("| full/depth |")[1].split("\n")[0].endswith("| abl_full_d |")
    scale = _section(text, "Efficiency at the seed paper's scale")
    assert "| mfnet | rgb+thermal | 9 | 3.88M |" in scale
    assert "= **73.9M total, 5.23M trainable**" in scale
    assert "| seed paper (reported) | 121.4M | 40.6M |" in scale and "| CMNeXt (reported) | 525.1M | – |" in scale


def test_csv_rows_match_inputs(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    with (out / "metrics.csv").open() as handle:
        rows = {row["task"]: row for row in csv.DictReader(handle)}
    seg, sod, ablation = rows["seg_tpmome"], rows["sod_tpmome"], rows["abl_full_t"]
    assert (seg["streams"], seg["head"], seg["method"], seg["psst"], seg["is_random_init"]) == (
        "rgb+thermal", "segmentation", "tp_mome", "full", "True")
    assert float(seg["overall.miou"]) == 0.413 and float(seg["groups.night.miou"]) == 0.38
    assert float(seg["overall.per_class_iou.car"]) == 0.413 and seg["overall.per_class_iou.bike"] == ""
    assert "overall.confusion_matrix" not in seg and "overall.miou_policy" not in seg
    assert float(sod["overall.s_measure"]) == 0.812 and float(sod["overall.mae"]) == 0.045
    assert float(ablation["overall_std.miou"]) == pytest.approx(np.std([0.36, 0.38, 0.40], ddof=1))
    assert ablation["seeds"] == "3" and ablation["label_fraction"] == "0.1"
    with (out / "efficiency.csv").open() as handle:
        efficiency = {row["task"]: row for row in csv.DictReader(handle)}
    assert int(efficiency["seg_lora"]["trainable_params"]) == 800_000
    assert efficiency["seg_tpmome"]["modality_loras"] == "full/thermal" and efficiency["seg_lora"]["modality_loras"] == ""


def test_figures_are_pngs(report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    assert {"main_metric.png", "methods.png", "label_efficiency.png", "predictions_seg_tpmome.png"} <= \
        set(summary["figures"])
    assert "predictions_rgb_seg.png" not in summary["figures"]  # rgb_seg has no predictions grid
    assert sorted(summary["figures"]) == sorted(p.name for p in out.glob("*.png"))
    for name in summary["figures"]:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 0
            image.verify()
    text = (out / "README.md").read_text()
    assert "![label_efficiency.png](label_efficiency.png)" in text and "(predictions_sod_tpmome.png)" in text


def test_incomplete_task_is_listed(report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    assert summary["incomplete"] == {"broken": "missing eval/metrics.json"}
    assert "Incomplete, not reported: `broken` (missing eval/metrics.json)" in (out / "README.md").read_text()


def test_only_what_the_dag_builds_is_reported(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Folders an earlier experiment left behind (other tasks, LoRA sets, probes) are not reported."""
    dag = InDag.from_params({"tasks": {"seg_tpmome": {}, "rgb_seg": {}, "broken": {}},
                             "loras": {"thermal_full": {"set": "full", "modality": "thermal"}}, "foundations": {}})
    summary = write_report(inputs["tasks"], inputs["lora"], tmp_path / "reports", psst_dir=inputs["psst"],
                           foundation_dir=inputs["foundation"], dag=dag)
    assert summary["tasks"] == ["rgb_seg", "seg_tpmome"] and summary["incomplete"] == {"broken": "missing eval/metrics.json"}
    assert summary["cumulative"]["modality_loras"] == ["full/thermal"]
    text = (tmp_path / "reports" / "README.md").read_text()
    assert "| thermal_full |" in text and "full/depth" not in text and "## Foundation models" not in text


def test_rerun_replaces_the_folder(inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the stage reports every folder it finds
    out = tmp_path / "reports"
    write_report(inputs["tasks"], inputs["lora"], out)
    (out / "stale.txt").write_text("from an older run")
    only = tmp_path / "tasks"
    only.mkdir()
    (only / "sod_tpmome").symlink_to(inputs["tasks"] / "sod_tpmome", target_is_directory=True)
    stage_main(only, inputs["lora"], out)
    assert "report: 1 task(s), 2 figure(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "efficiency.csv", "main_metric.png", "metrics.csv",
                                                     "predictions_sod_tpmome.png"]
    text = (out / "README.md").read_text()
    assert "Warning" not in text and "Stage 1 diagnostics" in text and "Foundation models" not in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_tasks_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="finetune and evaluate"):
        write_report(tmp_path / "nothing", tmp_path / "lora", tmp_path / "reports")
