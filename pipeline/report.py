"""The `report` stage: every task's recorded metrics and costs -> reports/ (README, CSVs, figures).

Numbers are read from what the finetune and evaluate stages wrote (model/task.json,
eval/metrics.json) and from the modality LoRA artifacts, never recomputed, so the report cannot
drift from the DVC outputs. The README shows scores x100 with one decimal; the CSVs keep the raw
values for anyone who wants to plot or test them.
"""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.artifacts import atomic_dir, read_json

# Where the finetune / evaluate / export stages put things (pipeline/training/tasks.py and
# pipeline/models/lora.py; not imported, to keep this stage free of torch-model imports).
TASK_INFO = Path("model/task.json")
EVAL_METRICS = Path("eval/metrics.json")
PREDICTIONS = Path("eval/predictions.png")
LORA_PROVENANCE = "xmodal.json"

RANDOM_INIT_WARNING = "random-initialised encoder: numbers show the pipeline works, not what pretrained weights reach"
# head -> (main metric, label, secondary metric, label)
HEAD_METRICS = {
    "segmentation": ("miou", "mIoU", "pixel_accuracy", "pixel acc"),
    "sod": ("s_measure", "S-measure", "mae", "MAE"),
}
FP32_BYTES = 4
COMPARED = ("dataset", "streams", "head", "method")  # what comparisons hold fixed, all but one


@dataclass(frozen=True)
class TaskResult:
    """One task's model/task.json and eval/metrics.json, read once."""

    name: str
    info: dict[str, Any]
    metrics: dict[str, Any]
    predictions: Path | None

    @property
    def config(self) -> dict[str, Any]:
        return self.info["config"]

    @property
    def head(self) -> str:
        return self.config["head"]

    @property
    def dataset(self) -> str:
        return self.config["dataset"]

    @property
    def streams(self) -> str:
        return "+".join(self.config["streams"])

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def train(self) -> dict[str, Any]:
        return self.info["metrics"]

    @property
    def groups(self) -> list[str]:
        return list(self.metrics.get("groups", {}))

    def score(self, key: str, group: str | None = None) -> float | None:
        scores = self.metrics["overall"] if group is None else self.metrics.get("groups", {}).get(group, {})
        return scores.get(key)

    @property
    def main(self) -> float | None:
        return self.score(HEAD_METRICS[self.head][0])


@dataclass(frozen=True)
class ModalityLora:
    """A modality LoRA artifact: its provenance and its size on disk (all files of the folder)."""

    name: str
    provenance: dict[str, Any]
    bytes: int

    @property
    def parameters(self) -> int:
        return self.provenance["lora"]["parameters"]


def write_report(tasks_dir: Path, lora_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write `out_dir` (README.md, metrics.csv, efficiency.csv, PNGs) atomically; return a summary."""
    tasks, incomplete = discover_tasks(Path(tasks_dir))
    loras = discover_loras(Path(lora_dir))
    totals = cumulative(tasks, loras)
    method_groups = comparisons(tasks, vary="method")
    with atomic_dir(out_dir) as tmp:
        _write_csv(tmp / "metrics.csv", [metrics_row(t) for t in tasks])
        _write_csv(tmp / "efficiency.csv", [efficiency_row(t) for t in tasks])
        figures = []
        if tasks:
            main_metric_figure(tasks, tmp / "main_metric.png")
            figures.append("main_metric.png")
        if method_groups:
            methods_figure(method_groups, tmp / "methods.png")
            figures.append("methods.png")
        predictions = {}
        for task in tasks:
            if task.predictions is not None:
                predictions[task.name] = f"predictions_{task.name}.png"
                shutil.copyfile(task.predictions, tmp / predictions[task.name])
        (tmp / "README.md").write_text(readme(tasks, incomplete, loras, totals, figures, predictions))
    return {
        "out_dir": str(out_dir),
        "tasks": [t.name for t in tasks],
        "incomplete": incomplete,
        "random_init": [t.name for t in tasks if t.info["backbone"]["is_random_init"]],
        "figures": figures + list(predictions.values()),
        "cumulative": totals,
    }


def discover_tasks(tasks_dir: Path) -> tuple[list[TaskResult], dict[str, str]]:
    """Task folders with both a trained model and an evaluation; the others with what they lack."""
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"{tasks_dir} not found: run the finetune and evaluate stages first")
    tasks, incomplete = [], {}
    for folder in sorted(p for p in tasks_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        missing = [str(rel) for rel in (TASK_INFO, EVAL_METRICS) if not (folder / rel).is_file()]
        if missing:
            incomplete[folder.name] = "missing " + ", ".join(missing)
            continue
        task = TaskResult(folder.name, read_json(folder / TASK_INFO), read_json(folder / EVAL_METRICS),
                          folder / PREDICTIONS if (folder / PREDICTIONS).is_file() else None)
        if task.head not in HEAD_METRICS:
            raise ValueError(f"{folder}: head {task.head!r} has no main metric (known: {sorted(HEAD_METRICS)})")
        tasks.append(task)
    return tasks, incomplete


def discover_loras(lora_dir: Path) -> dict[str, ModalityLora]:
    """Modality LoRA folders (those with xmodal.json) by folder name, which is the stream name."""
    if not lora_dir.is_dir():
        return {}
    return {
        folder.name: ModalityLora(folder.name, read_json(folder / LORA_PROVENANCE),
                                  sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
        for folder in sorted(lora_dir.iterdir()) if (folder / LORA_PROVENANCE).is_file()
    }


def cumulative(tasks: Sequence[TaskResult], loras: Mapping[str, ModalityLora]) -> dict[str, Any]:
    """Cost of all tasks together: each task's own weights, plus every modality LoRA they reuse
    counted once (it is shared), against fine-tuning the whole model once per task."""
    used = sorted({m for t in tasks for m in t.info.get("modality_loras", {})})
    found = [loras[m] for m in used if m in loras]
    task_params = sum(t.train["parameters"]["trainable"] for t in tasks)
    task_bytes = sum(t.train["trainable_bytes"] for t in tasks)
    lora_params, lora_bytes = sum(lo.parameters for lo in found), sum(lo.bytes for lo in found)
    full = sum(t.train["parameters"]["total"] for t in tasks)
    return {
        "tasks": len(tasks),
        "task_trainable_params": task_params, "task_trainable_bytes": task_bytes,
        "modality_loras": [lo.name for lo in found], "missing_loras": [m for m in used if m not in loras],
        "lora_params": lora_params, "lora_bytes": lora_bytes,
        "params": task_params + lora_params, "bytes": task_bytes + lora_bytes,
        "full_finetune_params": full, "full_finetune_bytes_fp32": full * FP32_BYTES,
    }


def comparisons(tasks: Sequence[TaskResult], vary: str) -> dict[tuple, list[TaskResult]]:
    """Tasks that differ only in `vary` ("method" or "streams"), keyed by what they share.

    The label fraction is part of the key: methods trained on different label budgets are not
    comparable.
    """
    shared = [k for k in COMPARED if k != vary]
    groups: dict[tuple, list[TaskResult]] = defaultdict(list)
    for task in tasks:
        groups[(*(getattr(task, k) for k in shared), task.config["label_fraction"])].append(task)
    return {key: sorted(members, key=lambda t: (getattr(t, vary), t.name))
            for key, members in sorted(groups.items()) if len({getattr(t, vary) for t in members}) > 1}


# --- formatting -------------------------------------------------------------------------------

def fmt_score(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def fmt_params(count: int) -> str:
    """3 significant digits with k/M/G: 12.3k, 1.35M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            value = count / scale
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}{suffix}"
    return str(count)


def fmt_bytes(count: int) -> str:
    return f"{count / 2**20:.2f} MiB"


def fmt_fraction(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _group_names(tasks: Iterable[TaskResult]) -> list[str]:
    return sorted({g for t in tasks for g in t.groups})


# --- README -----------------------------------------------------------------------------------

def readme(tasks: Sequence[TaskResult], incomplete: Mapping[str, str], loras: Mapping[str, ModalityLora],
           totals: Mapping[str, Any], figures: Sequence[str], predictions: Mapping[str, str]) -> str:
    lines = ["# xmodal report", ""]
    random_init = [t.name for t in tasks if t.info["backbone"]["is_random_init"]]
    if random_init:
        lines += [f"> **Warning — {RANDOM_INIT_WARNING}** (tasks: {', '.join(random_init)}).", ""]
    lines += [(f"{len(tasks)} task(s) evaluated. Scores are ×100; per-group columns are the evaluation "
               "groups (e.g. day/dusk/night). Protocols are in each task's `eval/metrics.json`."), ""]
    if incomplete:
        lines += ["Incomplete, not reported: " + "; ".join(f"`{n}` ({why})" for n, why in incomplete.items()), ""]
    lines += _results_section(tasks)
    lines += _comparison_section(tasks, "method", "Method comparison",
                                 "Tasks on the same dataset, streams, head and label fraction.")
    lines += _comparison_section(tasks, "streams", "Stream comparison",
                                 "Tasks with the same dataset, head, method and label fraction.")
    lines += _efficiency_section(tasks, loras, totals)
    if figures or predictions:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({name})" for name in figures]
        lines += [f"- [{task}: predictions]({name})" for task, name in predictions.items()] + [""]
    return "\n".join(lines)


def _results_section(tasks: Sequence[TaskResult]) -> list[str]:
    lines = ["## Results per task", ""]
    for head, (main, label, second, second_label) in HEAD_METRICS.items():
        members = [t for t in tasks if t.head == head]
        if not members:
            continue
        groups = _group_names(members)
        header = ["task", "dataset", "streams", "method", "labels", label, second_label,
                  *(f"{label} {g}" for g in groups)]
        rows = ([t.name, t.dataset, t.streams, t.method, fmt_fraction(t.config["label_fraction"]),
                 fmt_score(t.score(main)), fmt_score(t.score(second)), *(fmt_score(t.score(main, g)) for g in groups)]
                for t in members)
        lines += [f"### {head}", "", *_table(header, rows)]
    return lines


def _comparison_section(tasks: Sequence[TaskResult], vary: str, title: str, note: str) -> list[str]:
    groups = comparisons(tasks, vary)
    if not groups:
        return []
    lines = [f"## {title}", "", note, ""]
    for members in groups.values():
        first = members[0]
        main, label = HEAD_METRICS[first.head][:2]
        names = _group_names(members)
        shared = [getattr(first, k) for k in COMPARED if k != vary]
        lines += [f"### {' · '.join(shared)} · labels {fmt_fraction(first.config['label_fraction'])}", ""]
        header = [vary, "task", label, *(f"{label} {g}" for g in names), "trainable params"]
        rows = ([getattr(t, vary), t.name, fmt_score(t.main), *(fmt_score(t.score(main, g)) for g in names),
                 fmt_params(t.train["parameters"]["trainable"])] for t in members)
        lines += _table(header, rows)
    return lines


def _efficiency_section(tasks: Sequence[TaskResult], loras: Mapping[str, ModalityLora],
                        totals: Mapping[str, Any]) -> list[str]:
    if not tasks:
        return []
    header = ["task", "method", "trainable params", "total params", "trainable weights", "modality LoRAs reused",
              "train s", "peak GPU memory"]
    rows = ([t.name, t.method, fmt_params(t.train["parameters"]["trainable"]),
             fmt_params(t.train["parameters"]["total"]), fmt_bytes(t.train["trainable_bytes"]),
             _reused(t), f"{t.train['train_seconds']:.1f}", _peak_memory(t.train.get("peak_gpu_memory_mb"))]
            for t in tasks)
    lines = ["## Efficiency", "", *_table(header, rows)]
    shared = ", ".join(f"{loras[m].name} {fmt_params(loras[m].parameters)}" for m in totals["modality_loras"])
    lines += [(
        f"**Cumulative over {totals['tasks']} task(s):** {fmt_params(totals['task_trainable_params'])} task "
        f"parameters ({fmt_bytes(totals['task_trainable_bytes'])}) + modality LoRAs counted once "
        f"({shared or 'none'}; {fmt_bytes(totals['lora_bytes'])}) = **{fmt_params(totals['params'])} parameters, "
        f"{fmt_bytes(totals['bytes'])}**, vs. {fmt_params(totals['full_finetune_params'])} parameters "
        f"(≈{fmt_bytes(totals['full_finetune_bytes_fp32'])} at fp32) for full fine-tuning of every task "
        f"({_percent(totals['params'], totals['full_finetune_params'])})."
    ), ""]
    if totals["missing_loras"]:
        lines += [f"Not found in the LoRA folder, not counted: {', '.join(totals['missing_loras'])}.", ""]
    if loras:
        used_by = {name: [t.name for t in tasks if name in t.info.get("modality_loras", {})] for name in loras}
        header = ["modality LoRA", "rank", "parameters", "artifact", "PSST mode", "used by"]
        rows = ([lo.name, str(lo.provenance["lora"]["rank"]), fmt_params(lo.parameters), fmt_bytes(lo.bytes),
                 str(lo.provenance.get("psst", {}).get("mode", "–")), ", ".join(used_by[lo.name]) or "–"]
                for lo in loras.values())
        lines += _table(header, rows)
    return lines


def _reused(task: TaskResult) -> str:
    names = sorted(task.info.get("modality_loras", {}))
    return f"{'+'.join(names)} ({fmt_bytes(task.train['modality_lora_bytes'])})" if names else "–"


def _peak_memory(megabytes: float | None) -> str:
    return "n/a (CPU)" if megabytes is None else f"{megabytes:.0f} MiB"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


# --- CSVs -------------------------------------------------------------------------------------

def metrics_row(task: TaskResult) -> dict[str, Any]:
    """Identity columns, then every number of metrics.json by its JSON path (overall.miou,
    groups.night.per_class_iou.car); lists such as the confusion matrix stay in the JSON."""
    return {"task": task.name, "dataset": task.dataset, "streams": task.streams, "head": task.head,
            "method": task.method, "label_fraction": task.config["label_fraction"],
            "is_random_init": task.info["backbone"]["is_random_init"], "main_metric": HEAD_METRICS[task.head][0],
            **_flatten("overall", task.metrics["overall"]), **_flatten("groups", task.metrics.get("groups", {}))}


def efficiency_row(task: TaskResult) -> dict[str, Any]:
    train = task.train
    return {"task": task.name, "method": task.method, "streams": task.streams,
            "trainable_params": train["parameters"]["trainable"], "total_params": train["parameters"]["total"],
            "trainable_bytes": train["trainable_bytes"],
            "modality_loras": "+".join(sorted(task.info.get("modality_loras", {}))),
            "modality_lora_bytes": train["modality_lora_bytes"], "train_seconds": train["train_seconds"],
            "steps": train["steps"], "effective_batch": train["effective_batch"],
            "labeled_images": train["labeled_images"], "peak_gpu_memory_mb": train.get("peak_gpu_memory_mb")}


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, item in value.items() for k, v in _flatten(f"{prefix}.{key}", item).items()}
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return {prefix: value}
    return {}


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Columns in first-seen order over all rows; a value a row lacks (or None) is left empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


# --- figures ----------------------------------------------------------------------------------

def main_metric_figure(tasks: Sequence[TaskResult], path: Path) -> None:
    """Each task's main metric (mIoU or S-measure), overall and per group, as grouped bars."""
    series = {"overall": [t.main for t in tasks]}
    for group in _group_names(tasks):
        series[group] = [t.score(HEAD_METRICS[t.head][0], group) for t in tasks]
    figure = Figure(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    _bars(axes, [f"{t.name}\n({HEAD_METRICS[t.head][1]})" for t in tasks], series)
    axes.set_title("Main metric per task (×100)")
    _save(figure, path)


def methods_figure(groups: Mapping[tuple, Sequence[TaskResult]], path: Path) -> None:
    """One panel per method comparison: methods as bars, overall and per group."""
    figure = Figure(figsize=(7.0, 3.8 * len(groups)), layout="constrained")
    for index, members in enumerate(groups.values(), start=1):
        first = members[0]
        main, label = HEAD_METRICS[first.head][:2]
        names = _group_names(members)
        axes = figure.add_subplot(len(groups), 1, index)
        _bars(axes, ["overall", *names],
              {f"{t.method} ({t.name})": [t.main, *(t.score(main, g) for g in names)] for t in members})
        axes.set_title(f"{first.dataset} · {first.streams} · {first.head} · labels "
                       f"{fmt_fraction(first.config['label_fraction'])}: {label} ×100")
    _save(figure, path)


def _bars(axes: Any, categories: Sequence[str], series: Mapping[str, Sequence[float | None]]) -> None:
    """Grouped bars: one cluster per category, one bar per series; missing values leave a gap."""
    width = 0.8 / len(series)
    positions = np.arange(len(categories))
    for i, (label, values) in enumerate(series.items()):
        heights = [np.nan if v is None else 100 * v for v in values]
        axes.bar(positions + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
    axes.set_xticks(positions, categories, fontsize="small")
    axes.set_ylim(0, 100)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")


def _save(figure: Figure, path: Path) -> None:
    """Render with the Agg canvas directly: no pyplot, no global backend, no display needed."""
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
