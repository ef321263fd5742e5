"""The `report` stage: every recorded metric and cost -> reports/ (README, CSVs, figures).

Numbers are read from what the stages wrote (model/summary.json and eval/metrics.json of every
task, the modality LoRA artifacts, Stage 1's probes, the foundation models, the paper-scale
counts), never recomputed, so the report cannot drift from the DVC outputs. The README shows
scores x100 with one decimal, as "mean ± std" over a task's seeds; the CSVs keep the raw
values. Its first section, "What the demo shows", is written from those numbers too: every
claim in it is a comparison the tables below contain, with the seed spread beside it.

Tables, when the tasks allow them:
* PSST ablation (the seed paper's layout): tasks that differ only in the PSST mode of their
  modality LoRAs; rows = mode, columns = tasks and their average.
* Label efficiency: tasks that differ only in the label fraction; one series per method and
  PSST mode, as a table and a figure of the main metric against the fraction.
* Method and stream comparisons: tasks that differ only in the method, or only in the streams.
"""

from __future__ import annotations

import csv
import math
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
from pipeline.data.types import RGB

# Where the stages put things (pipeline/training/tasks.py, probe.py, foundation.py and
# pipeline/models/lora.py; not imported, to keep this stage free of torch-model imports).
TASK_SUMMARY = Path("model/summary.json")
EVAL_METRICS = Path("eval/metrics.json")
PREDICTIONS = Path("eval/predictions.png")
LORA_PROVENANCE = "xmodal.json"
PROBE_METRICS = Path("probe/metrics.json")
FOUNDATION_INFO = "foundation.json"

RANDOM_INIT_WARNING = "random-initialised encoder: numbers show the pipeline works, not what pretrained weights reach"
# head -> (main metric, label, secondary metric, label)
HEAD_METRICS = {
    "segmentation": ("miou", "mIoU", "pixel_accuracy", "pixel acc"),
    "sod": ("s_measure", "S-measure", "mae", "MAE"),
    "detection": ("map_50", "mAP@50", "map", "mAP"),
}
FP32_BYTES = 4
NO_PSST = "–"  # the PSST column of a task without modality LoRAs
# The seed paper's ablation rows, in its order.
PSST_ROWS = {"none": "Stage 2 only", "mae": "+ MAE", "mae+dino": "+ DINO (no error weighting)",
             "full": "Full (error-weighted PSST)"}


@dataclass(frozen=True)
class TaskResult:
    """One task's model/summary.json and eval/metrics.json, read once."""

    name: str
    summary: dict[str, Any]
    metrics: dict[str, Any]
    predictions: Path | None

    @property
    def config(self) -> dict[str, Any]:
        return self.summary["config"]

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
    def label_fraction(self) -> float:
        return self.config["label_fraction"]

    @property
    def lora_set(self) -> str:
        return self.config.get("lora_set", NO_PSST)

    @property
    def psst(self) -> str:
        """The PSST mode of the task's modality LoRAs ("–" without any)."""
        modes = sorted({lora.get("psst_mode", "?") for lora in self.summary.get("modality_loras", {}).values()})
        return "/".join(modes) if modes else NO_PSST

    @property
    def train(self) -> dict[str, Any]:
        return self.summary["metrics"]

    @property
    def seeds(self) -> list[int]:
        return self.metrics.get("seeds", [0])

    @property
    def backbone(self) -> dict[str, Any]:
        return self.summary["backbone"]

    @property
    def groups(self) -> list[str]:
        return list(self.metrics.get("groups", {}))

    def score(self, key: str, group: str | None = None) -> float | None:
        scores = self.metrics["overall"] if group is None else self.metrics.get("groups", {}).get(group, {})
        return scores.get(key)

    def spread(self, key: str, group: str | None = None) -> float | None:
        """Sample std of the score over the task's seeds (None for one seed)."""
        if len(self.seeds) < 2:
            return None
        spreads = self.metrics.get("overall_std", {}) if group is None else \
            self.metrics.get("groups_std", {}).get(group, {})
        return spreads.get(key)

    def per_seed(self, key: str) -> dict[str, float]:
        """The overall score of every seed, by seed."""
        return {seed: run["overall"][key] for seed, run in self.metrics.get("runs", {}).items()
                if run["overall"].get(key) is not None}

    @property
    def main_key(self) -> str:
        return HEAD_METRICS[self.head][0]

    @property
    def main(self) -> float | None:
        return self.score(self.main_key)

    def cell(self, key: str | None = None, group: str | None = None) -> str:
        key = key or self.main_key
        return fmt_score(self.score(key, group), self.spread(key, group))


@dataclass(frozen=True)
class ModalityLora:
    """A modality LoRA artifact (`<set>/<modality>`): its provenance and size on disk."""

    name: str
    provenance: dict[str, Any]
    bytes: int

    @property
    def parameters(self) -> int:
        return self.provenance["lora"]["parameters"]


def lora_key(directory: str | Path) -> str:
    """`<set>/<modality>` of a LoRA folder data/lora/<set>/<modality>."""
    path = Path(directory)
    return f"{path.parent.name}/{path.name}"


@dataclass(frozen=True)
class InDag:
    """What the current DAG builds (from params.yaml): the report leaves out the folders of
    tasks, Stage-1 runs and foundations that an earlier experiment left in the workspace."""

    tasks: frozenset[str]
    runs: frozenset[str]  # keys of `loras`
    loras: frozenset[str]  # their artifacts, `<set>/<modality>`
    foundations: frozenset[str]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> InDag:
        loras = params.get("loras") or {}
        return cls(frozenset(params.get("tasks") or {}), frozenset(loras),
                   frozenset(f"{run['set']}/{run['modality']}" for run in loras.values()),
                   frozenset(params.get("foundations") or {}))


def write_report(tasks_dir: Path, lora_dir: Path, out_dir: Path, *, psst_dir: Path | None = None,
                 foundation_dir: Path | None = None, paper_scale: Path | None = None,
                 dag: InDag | None = None) -> dict[str, Any]:
    """Write `out_dir` (README.md, CSVs, PNGs) atomically; return a summary. With `dag`, only
    what the current DAG builds is reported; without, everything found."""
    def keep(found: dict[str, Any], names: frozenset[str] | None) -> dict[str, Any]:
        return found if names is None else {k: v for k, v in found.items() if k in names}

    tasks, incomplete = discover_tasks(Path(tasks_dir), None if dag is None else dag.tasks)
    loras = keep(discover_loras(Path(lora_dir)), None if dag is None else dag.loras)
    probes = keep(discover(psst_dir, f"*/{PROBE_METRICS}"), None if dag is None else dag.runs)
    foundations = keep(discover(foundation_dir, f"*/{FOUNDATION_INFO}"), None if dag is None else dag.foundations)
    scale = read_json(Path(paper_scale)) if paper_scale is not None and Path(paper_scale).is_file() else None
    totals = cumulative(tasks, loras)
    method_groups = comparisons(tasks, vary="method")
    efficiency_groups = label_efficiency_groups(tasks)
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
        if efficiency_groups:
            label_efficiency_figure(efficiency_groups, tmp / "label_efficiency.png")
            figures.append("label_efficiency.png")
        predictions = {}
        for task in tasks:
            if task.predictions is not None:
                predictions[task.name] = f"predictions_{task.name}.png"
                shutil.copyfile(task.predictions, tmp / predictions[task.name])
        text = readme(tasks, incomplete, loras, totals, figures, predictions, probes, foundations, scale)
        (tmp / "README.md").write_text(text)
    return {
        "out_dir": str(out_dir),
        "tasks": [t.name for t in tasks],
        "incomplete": incomplete,
        "random_init": [t.name for t in tasks if t.backbone["is_random_init"]],
        "figures": figures + list(predictions.values()),
        "cumulative": totals,
    }


def discover_tasks(tasks_dir: Path, names: frozenset[str] | None = None) -> tuple[list[TaskResult], dict[str, str]]:
    """Task folders (of `names`, if given) with both a trained model and an evaluation; the
    others with what they lack."""
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"{tasks_dir} not found: run the finetune and evaluate stages first")
    tasks, incomplete = [], {}
    folders = (p for p in tasks_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in sorted(p for p in folders if names is None or p.name in names):
        missing = [str(rel) for rel in (TASK_SUMMARY, EVAL_METRICS) if not (folder / rel).is_file()]
        if missing:
            incomplete[folder.name] = "missing " + ", ".join(missing)
            continue
        task = TaskResult(folder.name, read_json(folder / TASK_SUMMARY), read_json(folder / EVAL_METRICS),
                          folder / PREDICTIONS if (folder / PREDICTIONS).is_file() else None)
        if task.head not in HEAD_METRICS:
            raise ValueError(f"{folder}: head {task.head!r} has no main metric (known: {sorted(HEAD_METRICS)})")
        tasks.append(task)
    return tasks, incomplete


def discover_loras(lora_dir: Path) -> dict[str, ModalityLora]:
    """Modality LoRA folders (those with xmodal.json) under `lora_dir`, by `<set>/<modality>`."""
    if not lora_dir.is_dir():
        return {}
    found = {}
    for record in sorted(lora_dir.glob(f"*/*/{LORA_PROVENANCE}")):
        folder = record.parent
        found[lora_key(folder)] = ModalityLora(lora_key(folder), read_json(record),
                                               sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
    return found


def discover(root: Path | None, pattern: str) -> dict[str, dict[str, Any]]:
    """JSON files matching `pattern` under `root`, by the name of their top folder."""
    if root is None or not Path(root).is_dir():
        return {}
    return {path.relative_to(root).parts[0]: read_json(path) for path in sorted(Path(root).glob(pattern))}


def cumulative(tasks: Sequence[TaskResult], loras: Mapping[str, ModalityLora]) -> dict[str, Any]:
    """Cost of all tasks together: each task's own weights, plus every modality LoRA they reuse
    counted once (it is shared), against fine-tuning the whole model once per task."""
    used = sorted({lora_key(r["dir"]) for t in tasks for r in t.summary.get("modality_loras", {}).values()})
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


# --- groupings --------------------------------------------------------------------------------

# What a comparison along one axis holds fixed: everything that could explain a difference.
# Streams are compared within one LoRA set, so an RGB-only task (no LoRA) meets the fused ones.
SHARED = {
    "method": ("dataset", "streams", "head", "label_fraction"),
    "streams": ("dataset", "head", "method", "lora_set", "label_fraction"),
    "psst": ("dataset", "streams", "head", "method", "label_fraction"),
}


def comparisons(tasks: Sequence[TaskResult], vary: str) -> dict[tuple, list[TaskResult]]:
    """Tasks that differ only in `vary` ("method", "streams" or "psst"), keyed by what they share."""
    groups: dict[tuple, list[TaskResult]] = defaultdict(list)
    for task in tasks:
        groups[tuple(getattr(task, k) for k in SHARED[vary])].append(task)
    return {key: sorted(members, key=lambda t: (getattr(t, vary), t.name))
            for key, members in sorted(groups.items()) if len({getattr(t, vary) for t in members}) > 1}


def psst_ablations(tasks: Sequence[TaskResult]) -> dict[tuple, dict[str, dict[tuple, TaskResult]]]:
    """(method, label fraction) -> PSST mode -> (dataset, streams, head) -> task: the ablation
    tables, where at least two modes were trained on the same tasks."""
    tables: dict[tuple, dict[str, dict[tuple, TaskResult]]] = defaultdict(lambda: defaultdict(dict))
    for members in comparisons(tasks, vary="psst").values():
        for task in members:
            if task.psst != NO_PSST:
                tables[(task.method, task.label_fraction)][task.psst][(task.dataset, task.streams, task.head)] = task
    return {key: dict(rows) for key, rows in sorted(tables.items()) if len(rows) > 1}


def label_efficiency_groups(tasks: Sequence[TaskResult]) -> dict[tuple, dict[str, dict[float, TaskResult]]]:
    """(dataset, streams, head) -> series (method and PSST mode) -> label fraction -> task, where
    some series was trained at two or more fractions."""
    groups: dict[tuple, dict[str, dict[float, TaskResult]]] = defaultdict(lambda: defaultdict(dict))
    for task in tasks:
        groups[(task.dataset, task.streams, task.head)][series_name(task)][task.label_fraction] = task
    return {key: dict(series) for key, series in sorted(groups.items())
            if any(len(points) > 1 for points in series.values())}


def series_name(task: TaskResult) -> str:
    return task.method if task.psst == NO_PSST else f"{task.method} · PSST {task.psst}"


# --- formatting -------------------------------------------------------------------------------

def fmt_score(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "–"
    if spread is None or not math.isfinite(spread):
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} ± {100 * spread:.1f}"


def fmt_params(count: float) -> str:
    """3 significant digits with k/M/G: 12.3k, 1.35M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            value = count / scale
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}{suffix}"
    return str(round(count))


def fmt_bytes(count: int) -> str:
    return f"{count / 2**20:.2f} MiB"


def fmt_fraction(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _group_names(tasks: Iterable[TaskResult]) -> list[str]:
    return sorted({g for t in tasks for g in t.groups})


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _per_seed_average(tasks: Sequence[TaskResult]) -> dict[str, float]:
    """Per seed that every task has, the mean over the tasks of their main metric."""
    per_seed = [t.per_seed(t.main_key) for t in tasks]
    seeds = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    return {seed: sum(s[seed] for s in per_seed) / len(per_seed) for seed in seeds}


def column_average(tasks: Sequence[TaskResult]) -> tuple[float | None, float | None]:
    """Mean over tasks of their main metric, with its spread over seeds: per seed the average
    over the tasks, then mean and sample std over the seeds every task has."""
    averages = _per_seed_average(tasks)
    if averages:
        return _mean_std(list(averages.values()))
    means = [t.main for t in tasks if t.main is not None]
    return (sum(means) / len(means), None) if means else (None, None)


def paired_differences(better: Sequence[TaskResult], worse: Sequence[TaskResult]) -> list[float]:
    """Per shared seed, the task average of `better` minus that of `worse`. A seed fixes the label
    subset, the initialisation and the crops for every method and LoRA set, so pairing by seed
    cancels the seed's own luck, which is most of the spread when labels are few."""
    a, b = _per_seed_average(better), _per_seed_average(worse)
    return [a[seed] - b[seed] for seed in sorted(set(a) & set(b))]


def fmt_paired(differences: Sequence[float]) -> str:
    """"+x.x ± s" (×100) of paired per-seed differences, and whether every seed agrees in sign."""
    mean, std = _mean_std(differences)
    if mean is None or std is None:
        return "–"
    signs = {(shown > 0) - (shown < 0) for shown in (round(100 * d, 1) for d in differences)}  # as printed
    verdict = {frozenset({1}): "every seed agrees", frozenset({-1}): "every seed agrees",
               frozenset({0}): "identical in every seed"}.get(frozenset(signs), "seeds disagree")
    return f"{100 * mean:+.1f} ± {100 * std:.1f} ({verdict})"


# --- README -----------------------------------------------------------------------------------

def readme(tasks: Sequence[TaskResult], incomplete: Mapping[str, str], loras: Mapping[str, ModalityLora],
           totals: Mapping[str, Any], figures: Sequence[str], predictions: Mapping[str, str],
           probes: Mapping[str, dict[str, Any]], foundations: Mapping[str, dict[str, Any]],
           scale: Mapping[str, Any] | None) -> str:
    lines = ["# xmodal report", ""]
    random_init = [t.name for t in tasks if t.backbone["is_random_init"]]
    if random_init:
        lines += [f"> **Warning — {RANDOM_INIT_WARNING}** (tasks: {', '.join(random_init)}).", ""]
    descriptions = sorted({t.backbone.get("weights_description", "?") for t in tasks if not t.backbone["is_random_init"]})
    built_here = {f["description"] for f in foundations.values()}
    for description in descriptions:
        note = (" — pretrained by this DAG on synthetic images (section Foundation models): the numbers measure "
                "the method on a miniature, not what SAM 2 reaches on real data") if description in built_here else ""
        lines += [f"> **Encoder: {description}**{note}.", ""]
    lines += [(f"{len(tasks)} task(s) evaluated. Scores are ×100, mean ± sample std over a task's seeds when it "
               "has several; per-group columns are the evaluation groups (e.g. day/dusk/night). Protocols are in "
               "each task's `eval/metrics.json`."), ""]
    if incomplete:
        lines += ["Incomplete, not reported: " + "; ".join(f"`{n}` ({why})" for n, why in incomplete.items()), ""]
    lines += findings_section(tasks, probes, foundations)
    lines += _results_section(tasks)
    lines += _ablation_section(tasks)
    lines += _label_efficiency_section(tasks)
    lines += _comparison_section(tasks, "method", "Method comparison",
                                 "Tasks on the same dataset, streams, head and label fraction.")
    lines += _comparison_section(tasks, "streams", "Stream comparison",
                                 "Tasks with the same dataset, head, method, LoRA set and label fraction.")
    lines += _stage1_section(probes, loras)
    lines += _foundation_section(foundations)
    lines += _efficiency_section(tasks, loras, totals)
    lines += _paper_scale_section(scale)
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
        header = ["task", "dataset", "streams", "method", "PSST", "labels", "seeds", label, second_label,
                  *(f"{label} {g}" for g in groups)]
        rows = ([t.name, t.dataset, t.streams, t.method, t.psst, fmt_fraction(t.label_fraction), str(len(t.seeds)),
                 t.cell(main), t.cell(second), *(t.cell(main, g) for g in groups)]
                for t in members)
        lines += [f"### {head}", "", *_table(header, rows)]
    return lines


def _ablation_section(tasks: Sequence[TaskResult]) -> list[str]:
    tables = psst_ablations(tasks)
    if not tables:
        return []
    lines = ["## PSST ablation", "",
             ("The seed paper's ablation layout: rows are the PSST mode of the modality LoRAs (each its own "
              "Stage-1 run, same schedule and seeds), columns the tasks; Stage 2 is identical in every row. "
              "Avg is over the mIoU columns, its spread over seeds of the per-seed average; Δ Avg is the "
              "difference to Stage 2 only paired by seed (same labels, initialisation and crops), mean ± std "
              "over the seeds."), ""]
    for (method, fraction), rows in tables.items():
        columns = sorted({c for row in rows.values() for c in row})
        seg_columns = [c for c in columns if c[2] == "segmentation"]
        header = ["configuration", *(f"{streams} {HEAD_METRICS[head][1]}" for _, streams, head in columns)]
        paired = seg_columns and "none" in rows and all(c in rows["none"] for c in seg_columns)
        header += ["Avg mIoU"] if seg_columns else []
        header += ["Δ Avg vs Stage 2 only (paired)"] if paired else []
        body = []
        for mode in sorted(rows, key=lambda m: list(PSST_ROWS).index(m) if m in PSST_ROWS else len(PSST_ROWS)):
            row = rows[mode]
            cells = [row[c].cell() if c in row else "–" for c in columns]
            if seg_columns:
                present = [row[c] for c in seg_columns if c in row]
                complete = len(present) == len(seg_columns)
                cells.append(fmt_score(*column_average(present)) if complete else "–")
                if paired:
                    baseline = [rows["none"][c] for c in seg_columns]
                    cells.append(fmt_paired(paired_differences(present, baseline))
                                 if complete and mode != "none" else "–")
            body.append([f"{PSST_ROWS.get(mode, mode)} (`{mode}`)", *cells])
        datasets = ", ".join(sorted({c[0] for c in columns}))
        lines += [f"### {method} · {datasets} · labels {fmt_fraction(fraction)}", "", *_table(header, body)]
    return lines


def _label_efficiency_section(tasks: Sequence[TaskResult]) -> list[str]:
    groups = label_efficiency_groups(tasks)
    if not groups:
        return []
    lines = ["## Label efficiency", "",
             "The main metric against the share of labelled training images (same schedule for every fraction).", ""]
    for (dataset, streams, head), series in groups.items():
        fractions = sorted({f for points in series.values() for f in points})
        label = HEAD_METRICS[head][1]
        header = ["method", *(fmt_fraction(f) for f in fractions)]
        rows = ([name, *(points[f].cell() if f in points else "–" for f in fractions)]
                for name, points in sorted(series.items()))
        lines += [f"### {dataset} · {streams} · {head}: {label}", "", *_table(header, rows)]
    return lines


def _comparison_section(tasks: Sequence[TaskResult], vary: str, title: str, note: str) -> list[str]:
    groups = comparisons(tasks, vary)
    if not groups:
        return []
    lines = [f"## {title}", "", note, ""]
    for key, members in groups.items():
        first = members[0]
        main, label = HEAD_METRICS[first.head][:2]
        names = _group_names(members)
        shared = [fmt_fraction(v) if k == "label_fraction" else str(v) for k, v in zip(SHARED[vary], key)]
        lines += [f"### {' · '.join(shared)}", ""]
        header = [vary, "task", "PSST", label, *(f"{label} {g}" for g in names), "trainable params"]
        rows = ([getattr(t, vary), t.name, t.psst, t.cell(main), *(t.cell(main, g) for g in names),
                 fmt_params(t.train["parameters"]["trainable"])] for t in members)
        lines += _table(header, rows)
    return lines


def _stage1_section(probes: Mapping[str, dict[str, Any]], loras: Mapping[str, ModalityLora]) -> list[str]:
    if not probes and not loras:
        return []
    lines = ["## Stage 1 diagnostics", ""]
    probed = {run: p for run, p in probes.items() if p.get("probed")}
    if probed:
        lines += [("Linear probe (ridge regression on frozen stride-8 features, fitted on one labelled split and "
                   "scored on another: `probe_lora@<run>`) of the encoder on RGB, on the modality without a LoRA "
                   "(the modality gap), after the warm-up, and with the exported modality LoRA. mIoU ×100."), ""]
        header = ["run", "modality", "PSST", "RGB", "no LoRA", "warm-up LoRA", "modality LoRA", "Δ LoRA",
                  "no LoRA night", "modality LoRA night"]
        rows = []
        for run, probe in probed.items():
            s = probe["summary"]
            rows.append([run, probe["modality"], probe["mode"], fmt_score(s["rgb"]["miou"]),
                         fmt_score(s["foundation"]["miou"]), fmt_score(s.get("warmup", {}).get("miou")),
                         fmt_score(s["lora"]["miou"]), f"{100 * probe['lora_gain_miou']:+.1f}",
                         fmt_score(s["foundation"].get("miou_night")), fmt_score(s["lora"].get("miou_night"))])
        lines += _table(header, rows)
    if loras:
        stages = sorted({k for lo in loras.values() for k in lo.provenance.get("lora_update", {}) if k != "all"})
        lines += ["How far each exported LoRA moves the frozen encoder: ‖ΔW‖ / ‖W‖ of the adapted qkv "
                  "weights per encoder stage, and the MAE loss on a fixed probe of pool images before the "
                  "warm-up and after the last phase.", ""]
        header = ["LoRA", "PSST", *stages, "all", "MAE probe before", "MAE probe after"]
        rows = []
        for lo in loras.values():
            update = lo.provenance.get("lora_update", {})
            warmup, joint = (lo.provenance.get("losses", {}).get(k, {}) for k in ("warmup", "joint"))
            after = joint.get("probe_loss_mae_after", warmup.get("probe_loss_mae_after"))
            rows.append([lo.name, lo.provenance.get("psst", {}).get("mode", "–"),
                         *(_fmt_decimal(update.get(s)) for s in stages), _fmt_decimal(update.get("all")),
                         _fmt_decimal(warmup.get("probe_loss_mae_before")), _fmt_decimal(after)])
        lines += _table(header, rows)
    return lines


def _fmt_decimal(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _foundation_section(foundations: Mapping[str, dict[str, Any]]) -> list[str]:
    if not foundations:
        return []
    lines = ["## Foundation models", "",
             ("Encoders pretrained by the DAG (`foundation@<name>`) on an RGB-only corpus disjoint from every task "
              "split, with masked image modelling and supervised segmentation in every step; held-out RGB scores "
              "of the pretraining decoder, ×100."), ""]
    groups = sorted({g for f in foundations.values() for g in f["held_out"]["groups"]})
    header = ["foundation", "description", "architecture", "parameters", "corpus images", "train s", "mIoU",
              *(f"mIoU {g}" for g in groups)]
    rows = ([name, f["description"], ", ".join(f"{k}={v}" for k, v in f["architecture"].items()),
             fmt_params(f["parameters"]), str(f["corpus"]["train_images"]), f"{f['train_seconds']:.0f}",
             fmt_score(f["held_out"]["overall"]["miou"]),
             *(fmt_score(f["held_out"]["groups"].get(g, {}).get("miou")) for g in groups)]
            for name, f in foundations.items())
    return lines + _table(header, rows)


def _efficiency_section(tasks: Sequence[TaskResult], loras: Mapping[str, ModalityLora],
                        totals: Mapping[str, Any]) -> list[str]:
    if not tasks:
        return []
    header = ["task", "method", "trainable params", "total params", "trainable weights", "modality LoRAs reused",
              "train s (per seed)", "peak GPU memory"]
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
        used_by = {name: [t.name for t in tasks if name in {lora_key(r["dir"]) for r in
                                                            t.summary.get("modality_loras", {}).values()}]
                   for name in loras}
        header = ["modality LoRA", "rank", "parameters", "artifact", "PSST mode", "used by"]
        rows = ([lo.name, str(lo.provenance["lora"]["rank"]), fmt_params(lo.parameters), fmt_bytes(lo.bytes),
                 str(lo.provenance.get("psst", {}).get("mode", "–")), ", ".join(used_by[lo.name]) or "–"]
                for lo in loras.values())
        lines += _table(header, rows)
    return lines


def _paper_scale_section(scale: Mapping[str, Any] | None) -> list[str]:
    if not scale:
        return []
    tasks = scale["tasks"]
    lines = ["## Efficiency at the seed paper's scale", "",
             (f"The same modules built on {scale['backbone']} for {len(tasks)} tasks and counted without training "
              f"(`paper_scale` stage): the frozen encoder once, each modality LoRA once (rank "
              f"{scale['lora']['rank']} on {', '.join(scale['lora']['targets'])}), every task's own "
              f"{scale['method']} parts."), ""]
    header = ["task", "streams", "classes", "trainable params"]
    rows = [[name, "+".join(t["streams"]), str(t["classes"]), fmt_params(t["trainable"])] for name, t in tasks.items()]
    lines += _table(header, rows)
    loras = scale["modality_loras"]
    lora_text = ", ".join(f"{m} {fmt_params(n)}" for m, n in loras.items()) or "none"
    lines += [(f"**Cumulative over {len(tasks)} tasks:** encoder {fmt_params(scale['encoder_parameters'])} (frozen, "
               f"shared) + modality LoRAs ({lora_text}) + task parts {fmt_params(scale['task_trainable'])} = "
               f"**{fmt_params(scale['total'])} total, {fmt_params(scale['trainable'])} trainable**."), ""]
    reported = scale.get("reported") or {}
    if reported:
        header = ["", "total", "trainable"]
        rows = [["xmodal (counted)", fmt_params(scale["total"]), fmt_params(scale["trainable"])]]
        rows += [[f"{name} (reported)", f"{v['total']:.1f}M" if "total" in v else "–",
                  f"{v['trainable']:.1f}M" if "trainable" in v else "–"] for name, v in reported.items()]
        lines += _table(header, rows)
    return lines


def _reused(task: TaskResult) -> str:
    names = sorted(lora_key(r["dir"]) for r in task.summary.get("modality_loras", {}).values())
    return f"{'+'.join(names)} ({fmt_bytes(task.train['modality_lora_bytes'])})" if names else "–"


def _peak_memory(megabytes: float | None) -> str:
    return "n/a (CPU)" if megabytes is None else f"{megabytes:.0f} MiB"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


# --- what the demo shows ------------------------------------------------------------------------

def _difference(better: TaskResult | Sequence[TaskResult], worse: TaskResult | Sequence[TaskResult]) -> str:
    """"+x.x (seed std a / b; paired by seed ...)" for the main metric (or the average over tasks),
    with two verdicts: against the larger seed spread, and whether every shared seed agrees."""
    better, worse = ([t] if isinstance(t, TaskResult) else list(t) for t in (better, worse))
    (a, a_std), (b, b_std) = column_average(better), column_average(worse)
    if a is None or b is None:
        return "–"
    delta = 100 * (a - b)
    if a_std is None or b_std is None:
        return f"{delta:+.1f} (one seed: no spread measured)"
    spread = 100 * max(a_std, b_std)
    verdict = "larger than" if abs(delta) > spread else "within"
    differences = paired_differences(better, worse)
    paired = f"; paired by seed {fmt_paired(differences)}" if len(differences) > 1 else ""
    return f"{delta:+.1f} ({verdict} the seed spread, std {100 * a_std:.1f} / {100 * b_std:.1f}{paired})"


def findings_section(tasks: Sequence[TaskResult], probes: Mapping[str, dict[str, Any]],
                     foundations: Mapping[str, dict[str, Any]]) -> list[str]:
    """Bullets generated from the metrics: what the measured comparisons say, with their spread."""
    bullets: list[str] = []
    for name, f in foundations.items():
        groups = f["held_out"]["groups"]
        per_group = ", ".join(f"{g} {fmt_score(m.get('miou'))}" for g, m in groups.items())
        bullets.append(f"Foundation model `{name}` ({f['description']}): held-out RGB mIoU "
                       f"{fmt_score(f['held_out']['overall']['miou'])} ({per_group}) after "
                       f"{f['steps']} steps on {f['corpus']['train_images']} RGB images.")
    for run, probe in probes.items():
        if probe.get("probed"):
            s = probe["summary"]
            bullets.append(
                f"Modality gap, {probe['modality']} (`{run}`, PSST {probe['mode']}): a linear probe of the frozen "
                f"features reads {fmt_score(s['rgb']['miou'])} mIoU from RGB but {fmt_score(s['foundation']['miou'])} "
                f"from {probe['modality']} without a LoRA, and {fmt_score(s['lora']['miou'])} with the modality LoRA "
                f"({100 * probe['lora_gain_miou']:+.1f}).")
    for (method, fraction), rows in psst_ablations(tasks).items():
        if "none" not in rows:
            continue
        baseline = [t for t in rows["none"].values() if t.head == "segmentation"]
        for mode in (m for m in PSST_ROWS if m in rows and m != "none"):
            same = [rows[mode][k] for k in rows["none"] if k in rows[mode] and k[2] == "segmentation"]
            if same and len(same) == len(baseline):
                tasks_text = f"{len(same)} segmentation task{'s' if len(same) > 1 else ''}"
                bullets.append(f"PSST ablation ({method}, {fmt_fraction(fraction)} labels, {tasks_text}): "
                               f"{PSST_ROWS[mode]} vs Stage 2 only: average mIoU {_difference(same, baseline)}.")
        pairs = {k: paired_differences([rows["full"][k]], [task]) for k, task in rows["none"].items()
                 if k in rows.get("full", {})}
        if len(pairs) > 1 and all(len(d) > 1 for d in pairs.values()):
            per_task = "; ".join(f"{streams} {HEAD_METRICS[head][1]} {fmt_paired(d)}"
                                 for (_, streams, head), d in pairs.items())
            bullets.append(f"PSST ablation per task ({method}, {fmt_fraction(fraction)} labels), {PSST_ROWS['full']} "
                           f"vs Stage 2 only, paired by seed: {per_task}.")
    for (dataset, streams, head), series in label_efficiency_groups(tasks).items():
        fractions = sorted({f for points in series.values() for f in points})
        for fraction in (fractions[0], fractions[-1]):
            here = {name: points[fraction] for name, points in series.items() if fraction in points}
            best = max(here.items(), key=lambda item: item[1].main or -1.0)
            ranked = ", ".join(f"{name} {t.cell()}" for name, t in sorted(here.items(), key=lambda i: -(i[1].main or 0)))
            bullets.append(f"Labels, {dataset} {streams} {head} at {fmt_fraction(fraction)}: best {best[0]}; "
                           f"{ranked}.")
    for members in comparisons(tasks, vary="streams").values():
        single = [t for t in members if t.streams == RGB]  # what each modality adds to RGB
        multi = [t for t in members if "+" in t.streams]
        for rgb in single:
            for fused in multi:
                key = rgb.main_key
                groups = [g for g in ("night",) if g in rgb.groups and g in fused.groups]
                night = "".join(f"; at night {fmt_score(fused.score(key, g))} vs {fmt_score(rgb.score(key, g))}"
                                for g in groups)
                bullets.append(f"Streams ({fused.method}, {fmt_fraction(fused.label_fraction)} labels): "
                               f"{fused.streams} vs {rgb.streams}: {HEAD_METRICS[fused.head][1]} "
                               f"{_difference(fused, rgb)}{night}.")
    if not bullets:
        return []
    return ["## What the demo shows", "",
            "Generated from the metrics below; a difference is called within the seed spread when it is smaller "
            "than the larger of the two standard deviations over seeds. Where both sides ran the same seeds "
            "(the same label subset, initialisation and crops), the per-seed differences are given too: "
            "a consistent effect smaller than the spread between seeds shows there.", "",
            *(f"- {b}" for b in bullets), ""]


# --- CSVs -------------------------------------------------------------------------------------

def metrics_row(task: TaskResult) -> dict[str, Any]:
    """Identity columns, then every number of metrics.json by its JSON path (overall.miou,
    groups.night.per_class_iou.car, overall_std.miou); lists stay in the JSON."""
    return {"task": task.name, "dataset": task.dataset, "streams": task.streams, "head": task.head,
            "method": task.method, "psst": task.psst, "label_fraction": task.label_fraction,
            "seeds": len(task.seeds), "is_random_init": task.backbone["is_random_init"],
            "main_metric": task.main_key,
            **_flatten("overall", task.metrics["overall"]), **_flatten("groups", task.metrics.get("groups", {})),
            **_flatten("overall_std", task.metrics.get("overall_std", {}))}


def efficiency_row(task: TaskResult) -> dict[str, Any]:
    train = task.train
    return {"task": task.name, "method": task.method, "streams": task.streams,
            "trainable_params": train["parameters"]["trainable"], "total_params": train["parameters"]["total"],
            "trainable_bytes": train["trainable_bytes"],
            "modality_loras": "+".join(sorted(lora_key(r["dir"]) for r in task.summary.get("modality_loras", {}).values())),
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
        series[group] = [t.score(t.main_key, group) for t in tasks]
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
              {f"{series_name(t)} ({t.name})": [t.main, *(t.score(main, g) for g in names)] for t in members})
        axes.set_title(f"{first.dataset} · {first.streams} · {first.head} · labels "
                       f"{fmt_fraction(first.label_fraction)}: {label} ×100")
    _save(figure, path)


def label_efficiency_figure(groups: Mapping[tuple, Mapping[str, Mapping[float, TaskResult]]], path: Path) -> None:
    """One panel per (dataset, streams, head): the main metric against the label fraction (log
    axis), a line per series with the seed std as error bars."""
    figure = Figure(figsize=(7.0, 4.2 * len(groups)), layout="constrained")
    for index, ((dataset, streams, head), series) in enumerate(groups.items(), start=1):
        axes = figure.add_subplot(len(groups), 1, index)
        for name, points in sorted(series.items()):
            fractions = sorted(points)
            means = [100 * (points[f].main or np.nan) for f in fractions]
            stds = [100 * (points[f].spread(points[f].main_key) or 0.0) for f in fractions]
            axes.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=name,
                          linestyle="--" if "none" in name else "-")
        axes.set_xscale("log")
        fractions = sorted({f for points in series.values() for f in points})
        axes.set_xticks(fractions, [fmt_fraction(f) for f in fractions])
        axes.set_xlabel("labelled training images")
        axes.set_ylabel(f"{HEAD_METRICS[head][1]} ×100")
        axes.set_title(f"Label efficiency: {dataset} · {streams} · {head}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
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
