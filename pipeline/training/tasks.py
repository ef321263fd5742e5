"""Stage 2 as plain functions of the composed parameters (what the stages call).

    run_finetune   task shards + modality LoRAs -> model/   trainable.safetensors, task.json
    run_evaluate   model/ + test shards -> eval/   metrics.json (with the protocol), predictions.png
    load_task_model  model/ -> the task model and how its inputs are encoded (evaluate, predict)

`task.json` records everything needed to rebuild the model without params.yaml: the
backbone's arguments and weights fingerprint, the method, the streams' encodings with their
mean/std, the classes, and the modality LoRA folders with the sha256 of their weights.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from tqdm.auto import tqdm

from pipeline.artifacts import PhaseOutputs, atomic_dir, load_trainable, read_json, save_trainable, write_json
from pipeline.config import section
from pipeline.data.loading import PairedAugment, Resize, shard_keys, shard_urls
from pipeline.data.modalities import ModalityEncoding
from pipeline.data.readers.base import voc_palette
from pipeline.data.sharding import MANIFEST, file_sha256, read_manifest
from pipeline.data.types import RGB
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.metrics import SegmentationMetrics, SODMetrics
from pipeline.models.backbone import create_backbone
from pipeline.training.callbacks import LossCurve
from pipeline.training.optim import OptimSettings
from pipeline.training.psst_data import EncodeImage, Normalization
from pipeline.training.task_data import (
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
from pipeline.training.trainer import config_hash, fit_resumable, input_fingerprints, total_steps, training_metrics
from pipeline.visualize import colorize, image_grid, input_to_rgb, saliency_to_rgb

TRAINABLE = "trainable.safetensors"
TASK_INFO = "task.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREDICTIONS_FIGURE = "predictions.png"


def _task(params: Mapping[str, Any], task: str) -> dict[str, Any]:
    return dict(section(params, f"tasks.{task}"))


def _classes(manifest: Mapping[str, Any], head: str) -> tuple[list[str], int, list]:
    """(class names, ignore index, palette) of the task's output."""
    if head == SOD:
        return ["background", "salient"], 255, [[0, 0, 0], [255, 255, 255]]
    names = manifest.get("class_names")
    if not names:
        raise ValueError(f"dataset {manifest.get('dataset')!r} has no class names: cannot train segmentation")
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
    """Train a task's method on its (label-budgeted) training split; write the model folder."""
    cfg = _task(params, task)
    method = MethodSettings.from_config(section(params, f"methods.{cfg['method']}"))
    train = cfg["train"]
    manifest = read_manifest(shard_dir)
    class_names, ignore_index, palette = _classes(manifest, cfg["head"])
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    backbone_cfg = dict(section(params, "backbone"))
    backbone = create_backbone(**backbone_cfg)
    lora_dirs = _lora_dirs(cfg["streams"], method, lora_root)
    model = TaskModel(backbone, cfg["streams"], method, head=cfg["head"],
                      num_classes=_num_outputs(cfg["head"], class_names),
                      decoder=cfg["decoder"], lora_dirs=lora_dirs)

    urls = shard_urls(shard_dir, train["split"])
    keys = label_subset(shard_keys(urls), cfg["label_fraction"], cfg["seed"])
    encoders = stream_encoders(cfg["streams"], section(params, "modalities"), manifest, urls,
                               (backbone.model.pretrained_cfg["mean"], backbone.model.pretrained_cfg["std"]),
                               train["normalization_images"], progress)
    foreground = foreground_ids(cfg.get("foreground_classes") or [], manifest.get("class_names"))
    transform = TaskSample(encoders, head=cfg["head"], foreground=foreground,
                           geometry=PairedAugment(train["image_size"], scale=train["crop_scale"]))
    stream = task_train_stream(urls, transform, keys=keys, epoch_samples=train["samples_per_epoch"], seed=cfg["seed"])
    trainer_cfg, workers = section(params, "trainer"), section(params, "loader.num_workers")
    steps = total_steps(trainer_cfg, epochs=train["epochs"], samples_per_epoch=train["samples_per_epoch"],
                        batch_size=train["batch_size"], num_workers=workers)
    module = TaskTraining(model, head=cfg["head"], ignore_index=ignore_index, total_steps=steps,
                          optim=OptimSettings(**train["optim"]))
    lora_files = {stream: path / ADAPTER_WEIGHTS for stream, path in lora_dirs.items()}
    manifest_sha256, *lora_sha256 = input_fingerprints([shard_dir / MANIFEST, *lora_files.values()])
    tag = config_hash({"task": cfg, "method": method.__dict__, "backbone": backbone_cfg, "trainer": trainer_cfg,
                       "inputs": [manifest_sha256, *lora_sha256]})
    curve = LossCurve(["loss"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = fit_resumable(
        module, stream, task_loader(stream, train["batch_size"], workers), trainer_cfg=trainer_cfg,
        logger_cfg=params.get("logger"), run_name=f"finetune/{task}", run_dirs=run_dirs, tag=tag,
        epochs=train["epochs"], batch_size=train["batch_size"], curve=curve,
        checkpoint_every_n_steps=train["checkpoint_every_n_steps"],
    )
    metrics: dict[str, Any] = {
        "task": task, "method": method.name, "streams": cfg["streams"], "head": cfg["head"],
        "label_fraction": cfg["label_fraction"], "labeled_images": len(keys),
        **training_metrics(trainer, curve, train["batch_size"], train["samples_per_epoch"], ["loss"]),
        "parameters": model.parameter_counts(),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        **backbone.provenance,
    }
    info = {
        "task": task, "config": cfg, "method": dict(section(params, f"methods.{cfg['method']}")),
        "backbone_config": backbone_cfg, "backbone": backbone.provenance,
        "classes": {"names": class_names, "ignore_index": ignore_index, "palette": palette},
        "encoders": {s: {"encoding": vars(e.encoding), "normalization": e.normalization.to_dict()}
                     for s, e in encoders.items()},
        "foreground_ids": foreground,
        "modality_loras": {s: {"dir": str(path), "sha256": sha} for (s, path), sha in zip(lora_dirs.items(), lora_sha256)},
        "shards": {"dir": str(shard_dir), "manifest_sha256": manifest_sha256},
        "label_keys": keys,
    }
    with atomic_dir(outputs.folder) as tmp:
        save_trainable(model, tmp / TRAINABLE)
        metrics["trainable_bytes"] = (tmp / TRAINABLE).stat().st_size
        metrics["modality_lora_bytes"] = sum(path.stat().st_size for path in lora_files.values())
        write_json(tmp / TASK_INFO, {**info, "metrics": metrics})
    outputs.publish(metrics, curve.csv_text())
    return metrics


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


def _new_metric(head: str, classes: Mapping[str, Any]) -> Metric:
    if head == SOD:
        return SODMetrics()
    return SegmentationMetrics(len(classes["names"]), ignore_index=classes["ignore_index"],
                               class_names=classes["names"])


def _to_output(logits: Tensor, head: str) -> Tensor:
    """Per-pixel output the metrics take: class ids, or saliency probabilities for SOD."""
    return logits[:, 0].sigmoid() if head == SOD else logits.argmax(1)


def run_evaluate(params: Mapping[str, Any], task: str, shard_dir: Path, model_dir: Path, outputs: PhaseOutputs,
                 progress: bool = True) -> dict[str, Any]:
    """Metrics of a trained task on its evaluation split, overall and per group (e.g. night)."""
    eval_cfg = _task(params, task)["eval"]
    model, info, encoders = load_task_model(model_dir)
    cfg, classes = info["config"], info["classes"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    geometry = Resize(eval_cfg["image_size"]) if eval_cfg.get("image_size") else None
    transform = TaskSample(encoders, head=cfg["head"], geometry=geometry, foreground=info["foreground_ids"])
    stream = task_eval_stream(shard_urls(shard_dir, eval_cfg["split"]), transform)
    overall = _new_metric(cfg["head"], classes).to(device)
    groups: dict[str, Metric] = defaultdict(lambda: _new_metric(cfg["head"], classes).to(device))
    figure_rows: dict[str, list[list[np.ndarray]]] = defaultdict(list)  # per group, for a spread
    started = time.perf_counter()
    for batch in tqdm(task_loader(stream, eval_cfg["batch_size"], 0), desc=f"evaluate {task}", unit="batch",
                      disable=not progress):
        inputs = {s: batch[s].to(device) for s in model.streams}
        logits = predict_logits(model, inputs, flip=eval_cfg["flip"])
        for i, target in enumerate(batch["full_target"]):
            output = _to_output(F.interpolate(logits[i: i + 1], size=tuple(target.shape), mode="bilinear",
                                              align_corners=False), cfg["head"])
            target = target[None].to(device)
            overall.update(output, target)
            group = sample_group(batch["meta"][i], batch["key"][i], eval_cfg.get("group_pattern"))
            if group is not None:
                groups[group].update(output, target)
            if len(figure_rows[group or ""]) < eval_cfg["figure_samples"]:
                figure_rows[group or ""].append(_figure_row(batch, i, output[0], target[0], encoders, model.streams,
                                                            cfg["head"], classes))
    seconds = time.perf_counter() - started
    metrics = {
        "task": task, "method": cfg["method"], "streams": cfg["streams"], "head": cfg["head"],
        "protocol": {
            "split": eval_cfg["split"], "input_size": eval_cfg.get("image_size") or "native",
            "scales": [1.0], "flip": eval_cfg["flip"], "sliding_window": False,
            "resolution": "logits upsampled (bilinear) to each label's original size",
            "metrics": _metric_definitions(cfg["head"]), "group_pattern": eval_cfg.get("group_pattern"),
        },
        "overall": overall.compute(),
        "groups": {name: metric.compute() for name, metric in sorted(groups.items())},
        "eval_seconds": round(seconds, 2),
        "is_random_init": info["backbone"]["is_random_init"],
    }
    with atomic_dir(outputs.folder) as tmp:
        write_json(tmp / "metrics.json", metrics)
        labels, rows = _spread(figure_rows, eval_cfg["figure_samples"])
        if rows:
            image_grid(rows, [*model.streams, "ground truth", "prediction"], labels).save(tmp / PREDICTIONS_FIGURE)
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
    if head == SOD:
        return ("PySODMetrics definitions: S-measure (alpha 0.5), weighted F (beta^2 1), E-measure and "
                "F-measure (beta^2 0.3) adaptive/mean/max over 256 thresholds, MAE; predictions quantised to 8 bits")
    return ("dataset-level confusion matrix; IoU per class; mIoU over classes present in ground truth or "
            "prediction; pixel accuracy; ignore index excluded")


def _figure_row(batch: Mapping[str, Any], i: int, output: Tensor, target: Tensor, encoders: Mapping[str, EncodeImage],
                streams: Sequence[str], head: str, classes: Mapping[str, Any]) -> list[np.ndarray]:
    size = tuple(target.shape)
    tiles = []
    for stream in streams:
        image = F.interpolate(batch[stream][i: i + 1], size=size, mode="bilinear", align_corners=False)[0]
        tiles.append(input_to_rgb(image, encoders[stream].normalization))
    tiles += [render_output(target.cpu().numpy(), head, classes), render_output(output.cpu().numpy(), head, classes)]
    return tiles


def render_output(output: np.ndarray, head: str, classes: Mapping[str, Any]) -> np.ndarray:
    """A label map or prediction as an RGB image (palette colours, or grey saliency)."""
    if head == SOD:
        return saliency_to_rgb(output.astype(np.float32))
    return colorize(output, classes["palette"], classes["ignore_index"])
