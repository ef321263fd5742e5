"""Stage 2 as plain functions of the composed parameters (what the stages call).

    run_finetune   task shards + modality LoRAs -> model/   seed<k>/ per seed (trainable.safetensors,
                                                            task.json), summary.json
    run_evaluate   model/ + test shards -> eval/   seed<k>/metrics.json, metrics.json (mean ± std over
                                                   the seeds, with the protocol), predictions.png
    load_task_model  model/seed<k>/ -> the task model and how its inputs are encoded (evaluate, predict)

A task trains once per seed in `tasks.<task>.seeds` (the label subset, the initialisation and
the crops follow the seed; every method sees the same subset for the same seed), so its scores
come with their spread. Each `seed<k>/` is a complete model folder: `task.json` records
everything needed to rebuild it without params.yaml (the backbone's arguments and weights
fingerprint, the method, the streams' encodings with their mean/std, the classes, the modality
LoRA folders with the sha256 of their weights).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import IterableDataset
from torchmetrics import Metric
from torchvision.models.detection.transform import resize_boxes
from tqdm.auto import tqdm

from pipeline.artifacts import PhaseOutputs, atomic_dir, load_trainable, read_json, save_trainable, write_json
from pipeline.config import section
from pipeline.data.loading import PairedAugment, Resize, TrainStream, shard_keys, shard_urls
from pipeline.data.modalities import ModalityEncoding
from pipeline.data.readers.base import voc_palette
from pipeline.data.sharding import MANIFEST, file_sha256, read_manifest
from pipeline.data.types import RGB
from pipeline.distributed import gather_objects, launch_ranks, union_over_ranks
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.metrics import SegmentationMetrics, SODMetrics
from pipeline.metrics.detection import PROTOCOL as DETECTION_PROTOCOL
from pipeline.metrics.detection import DetectionMetrics
from pipeline.metrics.seeds import mean_and_std
from pipeline.models.backbone import create_backbone
from pipeline.training.callbacks import LossCurve, curves_csv
from pipeline.training.optim import OptimSettings
from pipeline.training.psst_data import EncodeImage, Normalization
from pipeline.training.task_data import (
    DETECTION,
    SOD,
    TaskSample,
    foreground_ids,
    label_subset,
    sample_group,
    stream_encoders,
    task_eval_stream,
    task_loader,
    task_train_stream,
)
from pipeline.training.task_module import TaskTraining
from pipeline.training.trainer import (
    apply_memory_levers,
    config_hash,
    fit_resumable,
    input_fingerprints,
    phase_steps,
    training_metrics,
)
from pipeline.visualize import colorize, draw_boxes, image_grid, input_to_rgb, saliency_to_rgb

TRAINABLE = "trainable.safetensors"
TASK_INFO = "task.json"
SUMMARY = "summary.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREDICTIONS_FIGURE = "predictions.png"
LORA_PROVENANCE = "xmodal.json"


def seed_folder(seed: int) -> str:
    """The sub-folder of one seed's model (under model/) and metrics (under eval/)."""
    return f"seed{seed}"


def task_seeds(cfg: Mapping[str, Any], where: str) -> list[int]:
    seeds = cfg.get("seeds")
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) \
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"{where}.seeds must be a non-empty list of distinct integers, got {seeds!r}")
    return seeds


def _task(params: Mapping[str, Any], task: str) -> dict[str, Any]:
    return dict(section(params, f"tasks.{task}"))


def output_classes(manifest: Mapping[str, Any], head: str) -> tuple[list[str], int, list]:
    """(class names, ignore index, palette) of the task's output."""
    if head == SOD:
        return ["background", "salient"], 255, [[0, 0, 0], [255, 255, 255]]
    if head == DETECTION:
        names = manifest.get("box_class_names")
        if not names:
            raise ValueError(f"dataset {manifest.get('dataset')!r} has no boxes (no box_class_names in its "
                             "manifest): cannot train detection")
        return list(names), 255, voc_palette(len(names), start=1)
    names = manifest.get("class_names")
    if not names:
        raise ValueError(f"dataset {manifest.get('dataset')!r} has no class names: cannot train {head}")
    ignore = manifest.get("ignore_index")
    palette = manifest.get("palette") or voc_palette(len(names), start=0)
    return list(names), 255 if ignore is None else int(ignore), palette


def _num_outputs(head: str, class_names: Sequence[str]) -> int:
    """Decoder channels: one per class, or one saliency logit."""
    return 1 if head == SOD else len(class_names)


def _lora_dirs(streams: Sequence[str], method: MethodSettings, lora_root: Path) -> dict[str, Path]:
    if not method.modality_loras:
        return {}
    return {stream: lora_root / stream for stream in streams if stream != RGB}


def run_finetune(params: Mapping[str, Any], task: str, shard_dir: Path, lora_root: Path, outputs: PhaseOutputs,
                 run_dirs: Mapping[str, Path], progress: bool = True) -> dict[str, Any]:
    """Train a task's method on its (label-budgeted) training split once per seed; write model/."""
    cfg = _task(params, task)
    seeds = task_seeds(cfg, f"tasks.{task}")
    curves, infos = {}, {}
    with atomic_dir(outputs.folder) as tmp:
        for seed in seeds:
            infos[seed], curves[seed] = _finetune_seed(params, task, cfg, seed, shard_dir, lora_root,
                                                       tmp / seed_folder(seed), run_dirs, progress)
        runs = {seed: info["metrics"] for seed, info in infos.items()}
        mean, std = mean_and_std([{k: v for k, v in run.items() if k != "seed"} for run in runs.values()])
        metrics = {**mean, "std": std, "seeds": seeds, "runs": {str(k): v for k, v in runs.items()}}
        first = infos[seeds[0]]
        write_json(tmp / SUMMARY, {"task": task, "config": cfg, "backbone": first["backbone"],
                                   "modality_loras": first["modality_loras"], "seeds": seeds, "metrics": metrics})
    outputs.publish(metrics, curves_csv(curves, "seed"))
    return metrics


def _finetune_seed(params: Mapping[str, Any], task: str, cfg: Mapping[str, Any], seed: int, shard_dir: Path,
                   lora_root: Path, out_dir: Path, run_dirs: Mapping[str, Path], progress: bool
                   ) -> tuple[dict[str, Any], LossCurve]:
    """One seed of a task: train, then write its model folder `out_dir` (inside the task's
    temporary output folder, so nothing appears until every seed is done); returns task.json."""
    method = MethodSettings.from_config(section(params, f"methods.{cfg['method']}"))
    train = cfg["train"]
    manifest = read_manifest(shard_dir)
    class_names, ignore_index, palette = output_classes(manifest, cfg["head"])
    L.seed_everything(seed, workers=True, verbose=False)
    backbone_cfg = dict(section(params, "backbone"))
    backbone = apply_memory_levers(create_backbone(**backbone_cfg), params)
    lora_dirs = _lora_dirs(cfg["streams"], method, lora_root)
    model = TaskModel(backbone, cfg["streams"], method, head=cfg["head"],
                      num_classes=_num_outputs(cfg["head"], class_names),
                      decoder=cfg["decoder"], lora_dirs=lora_dirs)

    urls = shard_urls(shard_dir, train["split"])
    keys = label_subset(shard_keys(urls), cfg["label_fraction"], seed)
    encoders = stream_encoders(cfg["streams"], section(params, "modalities"), manifest, urls,
                               (backbone.model.pretrained_cfg["mean"], backbone.model.pretrained_cfg["std"]),
                               train["normalization_images"], progress)
    foreground = foreground_ids(cfg.get("foreground_classes") or [], manifest.get("class_names"))
    lora_files = {stream: path / ADAPTER_WEIGHTS for stream, path in lora_dirs.items()}
    manifest_sha256, *lora_sha256 = input_fingerprints([shard_dir / MANIFEST, *lora_files.values()])
    tag = config_hash({"task": cfg, "seed": seed, "method": method.__dict__, "backbone": backbone_cfg,
                       "trainer": section(params, "trainer"), "inputs": [manifest_sha256, *lora_sha256]})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    module = TaskTraining(model, head=cfg["head"], ignore_index=ignore_index, total_steps=phase_steps(params, train),
                          optim=OptimSettings(**train["optim"]))
    trainer, curve = fit_task_model(params, module, encoders, urls, keys, train, head=cfg["head"],
                                    foreground=foreground, seed=seed, run_name=f"finetune/{task}/{seed_folder(seed)}",
                                    tag=tag, run_dirs=run_dirs)
    metrics: dict[str, Any] = {
        "task": task, "seed": seed, "method": method.name, "streams": cfg["streams"], "head": cfg["head"],
        "label_fraction": cfg["label_fraction"], "labeled_images": len(keys),
        **training_metrics(trainer, curve, train["batch_size"], train["samples_per_epoch"], ["loss"]),
        "parameters": model.parameter_counts(),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        **backbone.provenance,
    }
    info = {
        "task": task, "seed": seed, "config": cfg, "method": dict(section(params, f"methods.{cfg['method']}")),
        "backbone_config": backbone_cfg, "backbone": backbone.provenance,
        "classes": {"names": class_names, "ignore_index": ignore_index, "palette": palette},
        "encoders": {s: {"encoding": vars(e.encoding), "normalization": e.normalization.to_dict()}
                     for s, e in encoders.items()},
        "foreground_ids": foreground,
        "modality_loras": {s: {"dir": str(path), "sha256": sha, "psst_mode": _psst_mode(path)}
                           for (s, path), sha in zip(lora_dirs.items(), lora_sha256)},
        "shards": {"dir": str(shard_dir), "manifest_sha256": manifest_sha256},
        "label_keys": keys,
    }
    out_dir.mkdir(parents=True)
    save_trainable(model, out_dir / TRAINABLE)
    metrics["trainable_bytes"] = (out_dir / TRAINABLE).stat().st_size
    metrics["modality_lora_bytes"] = sum(path.stat().st_size for path in lora_files.values())
    info["metrics"] = metrics
    write_json(out_dir / TASK_INFO, info)
    return info, curve


def _psst_mode(lora_dir: Path) -> str | None:
    """The PSST mode a modality LoRA was trained with (none = the identity LoRA; None: not recorded)."""
    return read_json(lora_dir / LORA_PROVENANCE).get("psst", {}).get("mode")


def training_stream(encoders: Mapping[str, EncodeImage], urls: Sequence[str], keys: Sequence[str],
                    train: Mapping[str, Any], *, head: str, foreground: Sequence[int], seed: int) -> TrainStream:
    """The labelled samples `keys` of `urls`, every stream encoded, cropped and flipped together
    at `train.image_size` (what a task trains on, and what benchmarks/loader_throughput.py times)."""
    transform = TaskSample(encoders, head=head, foreground=foreground,
                           geometry=PairedAugment(train["image_size"], scale=train["crop_scale"]))
    return task_train_stream(urls, transform, keys=keys, epoch_samples=train["samples_per_epoch"], seed=seed)


def fit_task_model(params: Mapping[str, Any], module: L.LightningModule, encoders: Mapping[str, EncodeImage],
                   urls: Sequence[str], keys: Sequence[str], train: Mapping[str, Any], *, head: str,
                   foreground: Sequence[int], seed: int, run_name: str, tag: str, run_dirs: Mapping[str, Path],
                   curve_keys: Sequence[str] = ("loss",)) -> tuple[L.Trainer, LossCurve]:
    """Train `module` on the labeled samples `keys` of `urls` with the `train` crops and epochs
    and the configured trainer; resumable under `tag`."""
    stream = training_stream(encoders, urls, keys, train, head=head, foreground=foreground, seed=seed)
    trainer_cfg, workers = section(params, "trainer"), section(params, "loader.num_workers")
    curve = LossCurve(list(curve_keys))
    trainer = fit_resumable(
        module, stream, task_loader(stream, train["batch_size"], workers), trainer_cfg=trainer_cfg,
        logger_cfg=params.get("logger"), run_name=run_name, run_dirs=run_dirs, tag=tag,
        epochs=train["epochs"], batch_size=train["batch_size"], curve=curve,
        checkpoint_every_n_steps=train["checkpoint_every_n_steps"], channels_last=section(params, "memory.channels_last"),
    )
    return trainer, curve


def load_task_model(model_dir: Path) -> tuple[TaskModel, dict[str, Any], dict[str, EncodeImage]]:
    """Rebuild a trained task model from its folder: (model in eval mode, task.json, encoders).

    The backbone is re-created from the recorded arguments and must reproduce the recorded
    weights fingerprint; each modality LoRA must still be the file it was trained with.
    """
    info = read_json(Path(model_dir) / TASK_INFO)
    backbone = create_backbone(**info["backbone_config"])
    if backbone.weights_fingerprint != info["backbone"]["weights_fingerprint"]:
        raise ValueError(
            f"{model_dir}: trained on backbone weights {info['backbone']['weights_fingerprint']} "
            f"({info['backbone']['weights_source']}), but the recorded backbone arguments now give "
            f"{backbone.weights_fingerprint} ({backbone.weights_source})"
        )
    lora_dirs = {}
    for stream, record in info["modality_loras"].items():
        path = Path(record["dir"])
        if file_sha256(path / ADAPTER_WEIGHTS) != record["sha256"]:
            raise ValueError(f"{model_dir}: the {stream} modality LoRA in {path} changed since this model was trained")
        lora_dirs[stream] = path
    cfg = info["config"]
    model = TaskModel(backbone, cfg["streams"], MethodSettings.from_config(info["method"]), head=cfg["head"],
                      num_classes=_num_outputs(cfg["head"], info["classes"]["names"]), decoder=cfg["decoder"],
                      lora_dirs=lora_dirs)
    load_trainable(model, Path(model_dir) / TRAINABLE)
    encoders = {
        stream: EncodeImage(ModalityEncoding(**saved["encoding"]),
                            Normalization(**{k: tuple(v) for k, v in saved["normalization"].items()}))
        for stream, saved in info["encoders"].items()
    }
    return model.eval(), info, encoders


@torch.no_grad()
def predict_logits(model: TaskModel, inputs: Mapping[str, Tensor], flip: bool = False) -> Tensor:
    """Single-scale logits, optionally averaged with the horizontally flipped pass."""
    logits = model(inputs)
    if flip:
        flipped = model({s: x.flip(-1) for s, x in inputs.items()})
        logits = (logits + flipped.flip(-1)) / 2
    return logits


def _new_metric(head: str, classes: Mapping[str, Any]) -> Metric | DetectionMetrics:
    if head == SOD:
        return SODMetrics()
    if head == DETECTION:
        return DetectionMetrics(classes["names"])
    return SegmentationMetrics(len(classes["names"]), ignore_index=classes["ignore_index"],
                               class_names=classes["names"])


def _to_output(logits: Tensor, head: str) -> Tensor:
    """Per-pixel output the metrics take: class ids, or saliency probabilities for SOD."""
    return logits[:, 0].sigmoid() if head == SOD else logits.argmax(1)


@torch.no_grad()
def scored_outputs(model: TaskModel, inputs: Mapping[str, Tensor], full_targets: Sequence[Any], *, head: str,
                   flip: bool = False) -> list[tuple[Any, Any]]:
    """Per sample (prediction, target) as the head's metric takes them, at each label's native
    size: dense logits upsampled (bilinear) to the label map, or detections whose boxes are
    scaled from the input size to the image's own."""
    if head == DETECTION:
        if flip:
            raise ValueError("eval.flip averages dense logits; set it false for a detection task")
        size = tuple(next(iter(inputs.values())).shape[-2:])
        detections = model(inputs).detections()
        return [([native_detections(d, size, tuple(t["size"].tolist()))], [t])
                for d, t in zip(detections, full_targets, strict=True)]
    logits = predict_logits(model, inputs, flip=flip)
    device = logits.device
    return [(_to_output(F.interpolate(logits[i: i + 1], size=tuple(t.shape), mode="bilinear", align_corners=False),
                        head), t[None].to(device)) for i, t in enumerate(full_targets)]


def native_detections(detections: Mapping[str, Tensor], size: tuple[int, int], native: tuple[int, int]
                      ) -> dict[str, Tensor]:
    """Detections of an input of `size` (H, W) in the pixels of the image's `native` size."""
    if tuple(size) == tuple(native):
        return dict(detections)
    return {**detections, "boxes": resize_boxes(detections["boxes"], list(size), list(native))}


@dataclass
class Evaluation:
    """What `evaluate_model` measured: metric values overall and per group, the time it took,
    and up to `figure_samples` figure rows per group (inputs, ground truth, prediction)."""

    overall: dict[str, Any]
    groups: dict[str, dict[str, Any]]
    seconds: float
    figure_rows: dict[str, list[list[np.ndarray]]]


def evaluate_model(model: TaskModel, stream: IterableDataset, *, head: str, classes: Mapping[str, Any],
                   batch_size: int, flip: bool = False, group_pattern: str | None = None,
                   encoders: Mapping[str, EncodeImage] | None = None, figure_samples: int = 0,
                   num_workers: int = 0, progress: bool = True, desc: str = "evaluate") -> Evaluation:
    """Single-scale (optionally flipped) predictions of `model` over `stream`, scored at each
    label's original resolution, overall and per group (`group_pattern` on the file names).
    `num_workers` loader processes decode the shards (split between them), so a GPU is not left
    waiting for PNG decoding; the metrics and the figure do not depend on it."""
    device = next(model.parameters()).device
    overall = _new_metric(head, classes).to(device)
    groups: dict[str, Metric] = defaultdict(lambda: _new_metric(head, classes).to(device))
    figure_rows: dict[str, list[tuple[str, list[np.ndarray]]]] = defaultdict(list)  # per group: (key, row)
    started = time.perf_counter()
    for batch in tqdm(task_loader(stream, batch_size, num_workers), desc=desc, unit="batch", disable=not progress):
        inputs = {s: batch[s].to(device) for s in model.streams}
        scored = scored_outputs(model, inputs, batch["full_target"], head=head, flip=flip)
        for i, (output, target) in enumerate(scored):
            overall.update(output, target)
            group = sample_group(batch["meta"][i], batch["key"][i], group_pattern)
            if group is not None:
                groups[group].update(output, target)
            rows, key = figure_rows[group or ""], batch["key"][i]
            if encoders is not None and figure_samples and (len(rows) < figure_samples or key < rows[-1][0]):
                # the smallest keys, whatever order the loader workers delivered them in
                rows.append((key, _figure_row(batch, i, output, target, encoders, model.streams, head, classes)))
                rows.sort(key=lambda row: row[0])
                del rows[figure_samples:]
    # Under DDP each rank scored its own shards (split_by_node) and torchmetrics sums the states
    # over ranks in `compute`: every rank must compute the same groups, in the same order.
    names = union_over_ranks(groups)
    return Evaluation(overall.compute(), {name: groups[name].compute() for name in names},
                      time.perf_counter() - started, _first_rows_over_ranks(figure_rows, figure_samples))


def _first_rows_over_ranks(rows: Mapping[str, list[tuple[str, list[np.ndarray]]]], count: int
                           ) -> dict[str, list[list[np.ndarray]]]:
    """Per group, the figure rows of the `count` smallest sample keys among every rank's
    candidates: the shards are in key order, so the figure is the same on any number of ranks."""
    merged: dict[str, list[tuple[str, list[np.ndarray]]]] = defaultdict(list)
    for part in gather_objects(dict(rows)):
        for group, candidates in part.items():
            merged[group] += candidates
    return {group: [row for _, row in sorted(candidates, key=lambda c: c[0])[:count]]
            for group, candidates in merged.items()}


def figure_columns(streams: Sequence[str], head: str) -> list[str]:
    """Column titles of the prediction figure: each input with the predicted boxes then the ground
    truth (detection), or the inputs, the ground truth and the prediction (dense heads)."""
    if head == DETECTION:
        return [*(f"{s}: predicted" for s in streams), "ground truth"]
    return [*streams, "ground truth", "prediction"]


def save_prediction_figure(evaluation: Evaluation, columns: Sequence[str], count: int, path: Path) -> None:
    labels, rows = _spread(evaluation.figure_rows, count)
    if rows:
        image_grid(rows, columns, labels).save(path)


def run_evaluate(params: Mapping[str, Any], task: str, shard_dir: Path, model_dir: Path, outputs: PhaseOutputs,
                 progress: bool = True) -> dict[str, Any]:
    """Metrics of a trained task on its evaluation split, overall and per group (e.g. night),
    for every seed it was trained with, and their mean ± std. Runs on the trainer's processes
    and devices; torchmetrics sums the metric states over ranks."""
    eval_cfg = _task(params, task)["eval"]
    seeds = read_json(Path(model_dir) / SUMMARY)["seeds"]
    device = launch_ranks(section(params, "trainer"))  # each rank scores its share of the test shards
    runs, protocol = {}, None
    with atomic_dir(outputs.folder) as tmp:
        for seed in seeds:
            model, info, encoders = load_task_model(Path(model_dir) / seed_folder(seed))
            cfg, classes = info["config"], info["classes"]
            geometry = Resize(eval_cfg["image_size"]) if eval_cfg.get("image_size") else None
            transform = TaskSample(encoders, head=cfg["head"], geometry=geometry, foreground=info["foreground_ids"])
            figures = eval_cfg["figure_samples"] if seed == seeds[0] else 0
            evaluation = evaluate_model(
                model.to(device), task_eval_stream(shard_urls(shard_dir, eval_cfg["split"]), transform),
                head=cfg["head"], classes=classes, batch_size=eval_cfg["batch_size"], flip=eval_cfg["flip"],
                group_pattern=eval_cfg.get("group_pattern"), encoders=encoders, figure_samples=figures,
                num_workers=section(params, "loader.num_workers"), progress=progress, desc=f"evaluate {task} seed {seed}")
            runs[seed] = {"overall": evaluation.overall, "groups": evaluation.groups,
                          "eval_seconds": round(evaluation.seconds, 2)}
            (tmp / seed_folder(seed)).mkdir()
            write_json(tmp / seed_folder(seed) / "metrics.json", {"task": task, "seed": seed, **runs[seed]})
            if figures:
                save_prediction_figure(evaluation, figure_columns(model.streams, cfg["head"]), figures,
                                       tmp / PREDICTIONS_FIGURE)
            protocol = {
                "split": eval_cfg["split"], "input_size": eval_cfg.get("image_size") or "native",
                "scales": [1.0], "flip": eval_cfg["flip"], "sliding_window": False,
                "resolution": ("boxes scaled to each image's original size" if cfg["head"] == DETECTION
                               else "logits upsampled (bilinear) to each label's original size"),
                "metrics": _metric_definitions(cfg["head"]), "group_pattern": eval_cfg.get("group_pattern"),
                "seeds": f"mean and sample std (ddof 1) over seeds {seeds}",
                **({"detection": {**DETECTION_PROTOCOL, **model.decoder.protocol()}}
                   if cfg["head"] == DETECTION else {}),
            }
        mean, std = mean_and_std(list(runs.values()))
        metrics = {
            "task": task, "method": cfg["method"], "streams": cfg["streams"], "head": cfg["head"],
            "protocol": protocol, "seeds": seeds,
            "overall": mean["overall"], "groups": mean.get("groups", {}),
            "overall_std": std["overall"], "groups_std": std.get("groups", {}),
            "runs": {str(seed): run for seed, run in runs.items()},
            "eval_seconds": round(sum(run["eval_seconds"] for run in runs.values()), 2),
            "is_random_init": info["backbone"]["is_random_init"],
            "weights_description": info["backbone"]["weights_description"],
        }
        write_json(tmp / "metrics.json", metrics)
    outputs.publish(metrics)
    return metrics


def _spread(rows_by_group: Mapping[str, list], count: int) -> tuple[list[str], list]:
    """Up to `count` rows taken in turn from each group (day, dusk, night, ...), so the figure
    shows every condition and not only the first samples of the split."""
    labels, rows = [], []
    for index in range(count):
        for group, group_rows in sorted(rows_by_group.items()):
            if index < len(group_rows) and len(rows) < count:
                labels.append(group)
                rows.append(group_rows[index])
    order = sorted(range(len(rows)), key=lambda i: labels[i])  # grouped rows read best
    return [labels[i] for i in order], [rows[i] for i in order]


def _metric_definitions(head: str) -> str:
    if head == DETECTION:
        return DETECTION_PROTOCOL["definitions"]
    if head == SOD:
        return ("PySODMetrics definitions: S-measure (alpha 0.5), weighted F (beta^2 1), E-measure and "
                "F-measure (beta^2 0.3) adaptive/mean/max over 256 thresholds, MAE; predictions quantised to 8 bits")
    return ("dataset-level confusion matrix; IoU per class; mIoU over classes present in ground truth or "
            "prediction; pixel accuracy; ignore index excluded")


FIGURE_MIN_SCORE = 0.3  # detections drawn in the figure (the metrics use every detection)


def _figure_row(batch: Mapping[str, Any], i: int, output: Any, target: Any, encoders: Mapping[str, EncodeImage],
                streams: Sequence[str], head: str, classes: Mapping[str, Any]) -> list[np.ndarray]:
    if head == DETECTION:
        (pred,), (truth,) = output, target
        size = tuple(truth["size"].tolist())
    else:
        size = tuple(target.shape[-2:])
    images = [input_to_rgb(F.interpolate(batch[s][i: i + 1], size=size, mode="bilinear", align_corners=False)[0],
                           encoders[s].normalization) for s in streams]
    if head == DETECTION:
        shown = pred["scores"] >= FIGURE_MIN_SCORE
        tiles = [draw_boxes(image, pred["boxes"][shown], pred["labels"][shown], classes["names"], classes["palette"],
                            scores=pred["scores"][shown]) for image in images]
        return [*tiles, draw_boxes(images[0], truth["boxes"], truth["labels"], classes["names"], classes["palette"],
                                   crowd=truth["crowd"])]
    return [*images, render_output(target[0].cpu().numpy(), head, classes),
            render_output(output[0].cpu().numpy(), head, classes)]


def render_output(output: np.ndarray, head: str, classes: Mapping[str, Any]) -> np.ndarray:
    """A label map or prediction as an RGB image (palette colours, or grey saliency)."""
    if head == SOD:
        return saliency_to_rgb(output.astype(np.float32))
    return colorize(output, classes["palette"], classes["ignore_index"])
