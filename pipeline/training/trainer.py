"""Lightning trainers from `conf/trainer/` and loggers from `conf/logger/`, with resumable
checkpoints kept outside DVC outputs.

A run writes `last.ckpt` into its checkpoint folder every few steps, tagged with a hash of the
configuration that produced it. Re-running the same stage with the same configuration resumes
from it; a different configuration starts fresh (and says so), so an old checkpoint never
leaks into a changed experiment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from pipeline.config import section
from pipeline.data.loading import TrainStream
from pipeline.data.sharding import file_sha256
from pipeline.distributed import devices_of_ranks, world_size
from pipeline.models.backbone import Backbone
from pipeline.training.callbacks import LossCurve, SeedRanksApart, SetStreamEpoch, StopOnNonFiniteLoss

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def config_hash(config: Any) -> str:
    """Stable short hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _ConfigTag(Callback):
    """Stores the run's configuration hash in every checkpoint."""

    def __init__(self, tag: str):
        self.tag = tag

    def state_dict(self) -> dict[str, str]:
        return {"config_hash": self.tag}


def build_logger(logger_cfg: Mapping[str, Any] | None, save_dir: Path, name: str):
    """`conf/logger/*`: a `_target_` Lightning logger (CSV by default, wandb optional)."""
    if not logger_cfg:
        return False
    return instantiate(dict(logger_cfg), save_dir=str(save_dir), name=name)


def build_trainer(
    trainer_cfg: Mapping[str, Any],
    logger_cfg: Mapping[str, Any] | None,
    *,
    max_epochs: int,
    run_name: str,
    log_dir: Path,
    checkpoint_dir: Path,
    checkpoint_every_n_steps: int,
    tag: str,
    callbacks: Sequence[Callback] = (),
) -> L.Trainer:
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="step{step}", save_last=True, save_top_k=0,
        every_n_train_steps=checkpoint_every_n_steps,
    )
    return L.Trainer(
        **dict(trainer_cfg),
        max_epochs=max_epochs,
        logger=build_logger(logger_cfg, log_dir, run_name),
        callbacks=[checkpoint, _ConfigTag(tag), StopOnNonFiniteLoss(), SeedRanksApart(), *callbacks],
        default_root_dir=str(log_dir),
    )


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run stopped: its checkpoint, the epoch it was in, and how many
    batches of that epoch were done (the stream skips them, see `TrainStream.set_epoch`)."""

    path: str
    epoch: int
    batches_done: int


def resume_point(checkpoint_dir: Path, tag: str) -> ResumePoint | None:
    """The `last.ckpt` of an interrupted run with the same configuration, else None."""
    path = checkpoint_dir / LAST
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = next((v.get("config_hash") for k, v in state.get("callbacks", {}).items() if "_ConfigTag" in k), None)
    if saved != tag:
        log.warning("ignoring %s: written by a different configuration (%s, now %s)", path, saved, tag)
        return None
    batches = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    epoch, done = state["epoch"], batches["current"]["ready"]
    if batches["is_last_batch"]:  # saved at the end of an epoch: the next one starts afresh
        epoch, done = epoch + 1, 0
    log.info("resuming from %s (step %d, epoch %d, %d batches into it)", path, state["global_step"], epoch, done)
    return ResumePoint(str(path), epoch, done)


def steps_per_epoch(samples: int, batch_size: int, world_size: int = 1, num_workers: int = 0,
                    accumulate: int = 1) -> int:
    """Optimizer steps per epoch of a stream cut to `samples` over ranks and workers: each
    worker yields its share and batches it on its own, so partial batches add up per worker."""
    workers = max(1, num_workers)
    per_worker = math.ceil(samples / (world_size * workers))
    batches = workers * math.ceil(per_worker / batch_size)
    return math.ceil(batches / accumulate)


def input_fingerprints(paths: Sequence[Path]) -> list[str]:
    """sha256 of the files a run starts from: part of its resume tag, so a checkpoint written
    before an upstream stage changed its output is not resumed."""
    return [file_sha256(Path(p)) for p in paths]


def fit_resumable(
    module: L.LightningModule,
    stream: TrainStream,
    loader: DataLoader,
    *,
    trainer_cfg: Mapping[str, Any],
    logger_cfg: Mapping[str, Any] | None,
    run_name: str,
    run_dirs: Mapping[str, Path],
    tag: str,
    epochs: int,
    batch_size: int,
    curve: LossCurve,
    checkpoint_every_n_steps: int,
    channels_last: bool = False,
) -> L.Trainer:
    """Train `module` on `loader` (over `stream`) with the configured trainer, resuming an
    interrupted run of the same `tag` from `<checkpoints>/<run_name>/last.ckpt`;
    `channels_last` is the `memory.channels_last` lever."""
    checkpoint_dir = run_dirs["checkpoints"] / run_name
    trainer = build_trainer(
        trainer_cfg, logger_cfg, max_epochs=epochs, run_name=run_name, log_dir=run_dirs["logs"],
        checkpoint_dir=checkpoint_dir, tag=tag, checkpoint_every_n_steps=checkpoint_every_n_steps,
        callbacks=[curve, SetStreamEpoch(stream), *([ChannelsLast()] if channels_last else [])],
    )
    resume = resume_point(checkpoint_dir, tag)
    if resume is not None:
        stream.set_epoch(resume.epoch, batches_done=resume.batches_done, batch_size=batch_size)
    trainer.fit(module, loader, ckpt_path=resume.path if resume else None)
    discard_checkpoints(trainer, checkpoint_dir)
    return trainer


def discard_checkpoints(trainer: L.Trainer, checkpoint_dir: Path) -> None:
    """Remove a finished run's resume checkpoints (from global rank 0, once every rank is done).

    Resuming is for interrupted runs: a forced re-run (`dvc repro -f`) must train afresh, not
    "resume" a run with nothing left to do, and finished runs should not leave hundreds of MB
    behind. An interrupted or failed run never gets here, so its `last.ckpt` stays.
    """
    if not trainer.state.finished:
        return
    trainer.strategy.barrier("discard_checkpoints")
    if trainer.is_global_zero:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def total_steps(trainer_cfg: Mapping[str, Any], *, epochs: int, samples_per_epoch: int, batch_size: int,
                num_workers: int) -> int:
    """Optimizer steps of a whole run (what the LR schedule spans)."""
    per_epoch = steps_per_epoch(samples_per_epoch, batch_size, world_size(trainer_cfg), num_workers,
                                trainer_cfg.get("accumulate_grad_batches", 1))
    return epochs * per_epoch


def apply_memory_levers(backbone: Backbone, params: Mapping[str, Any]) -> Backbone:
    """The encoder's `memory` levers (conf/config.yaml): activation checkpointing and compiled
    blocks. (`memory.channels_last` applies to the whole training module: `ChannelsLast`.)"""
    backbone.set_activation_checkpointing(section(params, "memory.activation_checkpointing"))
    backbone.set_compile(section(params, "memory.compile"))
    return backbone


class ChannelsLast(Callback):
    """`memory.channels_last`: every 4-D weight of the training module in NHWC layout before the
    run. A convolution whose weight is channels-last runs (and returns) channels-last, so the
    patch embedding, the fusion's and decoders' convolutions (FCOS's towers above all) take the
    layout GPU tensor cores read natively under bf16; Hiera's tokens are NHWC already."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)


def is_channels_last(module: torch.nn.Module) -> bool:
    """Whether the module's spatial convolution weights are channels-last (what was applied)."""
    weights = [p for p in module.parameters() if p.ndim == 4 and p.shape[-2:] != (1, 1)]
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


def memory_levers(module: torch.nn.Module) -> dict[str, Any]:
    """The memory levers a run applied, as train.json records them."""
    backbones = [m for m in module.modules() if isinstance(m, Backbone)]
    return {
        "activation_checkpointing": sorted({s for b in backbones for s in b.checkpointed_stages}),
        "compile": next((b.compile_backend for b in backbones if b.compile_backend), False),
        "channels_last": is_channels_last(module),
    }


def phase_steps(params: Mapping[str, Any], phase: Mapping[str, Any]) -> int:
    """Optimizer steps of a training phase (its `epochs`, `samples_per_epoch`, `batch_size`)
    under the configured trainer and dataloader workers."""
    return total_steps(params["trainer"], epochs=phase["epochs"], samples_per_epoch=phase["samples_per_epoch"],
                       batch_size=phase["batch_size"], num_workers=params["loader"]["num_workers"])


def training_scale(trainer: L.Trainer, batch_size: int) -> dict[str, Any]:
    """How a run was spread (what a number needs to be reproduced on another machine): ranks,
    nodes, per-device and effective batch, accumulation, precision, and the device of every
    rank (`{name: [ranks]}`: a mixed allocation shows)."""
    return {
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "devices_per_node": trainer.num_devices,
        "per_device_batch": batch_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "effective_batch": batch_size * trainer.world_size * trainer.accumulate_grad_batches,
        "precision": str(trainer.precision),
        "devices": devices_of_ranks(trainer.strategy.root_device),
    }


def training_metrics(trainer: L.Trainer, curve: LossCurve, batch_size: int, samples_per_epoch: int,
                     keys: Sequence[str]) -> dict[str, Any]:
    """What every training stage records: steps, effective batch, time, throughput, and the
    start/end of each loss curve."""
    metrics: dict[str, Any] = {
        "trained": True,
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        **training_scale(trainer, batch_size),
        **memory_levers(trainer.lightning_module),
        "train_seconds": round(curve.seconds, 2),
        "images_per_second": round(trainer.current_epoch * samples_per_epoch / max(curve.seconds, 1e-9), 2),
    }
    for key in keys:
        ends = curve.first_and_last(key)
        if ends is not None:
            metrics[f"{key}_start"], metrics[f"{key}_end"] = round(ends[0], 6), round(ends[1], 6)
    return metrics
