"""The `probe_lora@<run>` stage: does a modality LoRA make the modality easier to read?

For one Stage-1 run, a linear probe (pipeline/methods/probe.py) of the frozen encoder's
features is fitted and scored on a labelled dataset of the modality (`probe.datasets.<m>`,
e.g. the demo's train/val splits; none for an unlabelled real pool such as HIT-UAV) for:

    rgb         the RGB images of the same scenes, no adapter: what the encoder reads natively
    foundation  the modality through the encoder, no adapter: the modality gap
    warmup      the modality with the LoRA after the MAE warm-up (when the run trains one)
    lora        the modality with the exported modality LoRA (the artifact Stage 2 uses)

Labels are read only here, never by Stage 1's training.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import PhaseOutputs, atomic_dir, write_json
from pipeline.config import section
from pipeline.data.loading import shard_urls
from pipeline.data.sharding import read_manifest
from pipeline.data.types import RGB
from pipeline.methods.probe import linear_probe
from pipeline.models.lora import load_lora, use_adapter
from pipeline.training.psst import TRAINABLE, build_network, stage1_run
from pipeline.training.task_data import SEGMENTATION, TaskSample, stream_encoders, task_eval_stream, task_loader
from pipeline.training.tasks import output_classes

WARMUP_ADAPTER = "default"  # the PSST network's own LoRA, loaded from the warm-up
EXPORTED_ADAPTER = "exported"


def run_probe(params: Mapping[str, Any], lora: str, shards_root: Path, warmup_dir: Path, lora_dir: Path,
              outputs: PhaseOutputs, progress: bool = True) -> dict[str, Any]:
    """Probe the encoder with and without the run's LoRAs; write `outputs.folder`/metrics.json."""
    run = stage1_run(params, lora)
    cfg = section(params, "probe")
    metrics: dict[str, Any] = {"lora": lora, "set": run.set, "modality": run.modality, "mode": run.mode}
    dataset = (cfg.get("datasets") or {}).get(run.modality)
    if dataset is None:
        metrics.update(probed=False, reason=f"probe.datasets has no {run.modality!r}: no labelled split to probe")
    else:
        metrics.update(probed=True, **_probe_variants(params, run.modality, run.modality_cfg, cfg, dataset, run.mode,
                                                      shards_root, warmup_dir, lora_dir, run.psst, progress))
    with atomic_dir(outputs.folder) as tmp:
        write_json(tmp / "metrics.json", metrics)
    outputs.publish(metrics)
    return metrics


def _probe_variants(params: Mapping[str, Any], modality: str, modality_cfg: Mapping[str, Any],
                    cfg: Mapping[str, Any], dataset: str, mode: str, shards_root: Path, warmup_dir: Path,
                    lora_dir: Path, psst: Mapping[str, Any], progress: bool) -> dict[str, Any]:
    shard_dir = shards_root / dataset
    manifest = read_manifest(shard_dir)
    class_names, ignore_index, _ = output_classes(manifest, SEGMENTATION)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    network = build_network(params, psst, warmup_dir / TRAINABLE).eval().to(device)
    backbone, peft = network.backbone, network.peft
    load_lora(backbone, lora_dir, EXPORTED_ADAPTER, peft)
    fit_urls = shard_urls(shard_dir, cfg["fit_split"])
    rgb_stats = (backbone.model.pretrained_cfg["mean"], backbone.model.pretrained_cfg["std"])
    encoders = stream_encoders([RGB, modality], {modality: modality_cfg}, manifest, fit_urls, rgb_stats,
                               cfg["fit_images"], progress)
    transform = TaskSample(encoders, head=SEGMENTATION, geometry=None)

    def batches(split: str, limit: int | None) -> list[dict[str, Any]]:  # decoded once, reused by every variant
        stream = task_eval_stream(shard_urls(shard_dir, split), transform)
        samples = islice(stream, limit) if limit else stream
        return list(task_loader(list(samples), cfg["batch_size"], 0))

    fit, test = batches(cfg["fit_split"], cfg["fit_images"]), batches(cfg["test_split"], None)
    variants = {"rgb": (RGB, None), "foundation": (modality, None)}
    if mode != "none":
        variants["warmup"] = (modality, WARMUP_ADAPTER)
    variants["lora"] = (modality, EXPORTED_ADAPTER)
    results = {}
    for name, (stream, adapter) in variants.items():
        def encoder(images: torch.Tensor, adapter: str | None = adapter) -> list[torch.Tensor]:
            with use_adapter(peft, adapter):
                return backbone(images.to(device))

        results[name] = linear_probe(encoder, fit, test, stream=stream, num_classes=len(class_names),
                                     ignore_index=ignore_index, class_names=class_names, ridge=cfg["ridge"],
                                     group_pattern=cfg.get("group_pattern"))
    summary = {name: {"miou": r["overall"]["miou"], "pixel_accuracy": r["overall"]["pixel_accuracy"],
                      **{f"miou_{g}": m["miou"] for g, m in r["groups"].items()}} for name, r in results.items()}
    return {"dataset": dataset, "fit_split": cfg["fit_split"], "test_split": cfg["test_split"],
            "fit_images": sum(len(b["key"]) for b in fit), "test_images": sum(len(b["key"]) for b in test),
            "fit_cells": results["rgb"]["fit_cells"], "summary": summary,
            "lora_gain_miou": summary["lora"]["miou"] - summary["foundation"]["miou"],
            "variants": results}
