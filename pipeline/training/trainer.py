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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

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
        callbacks=[checkpoint, _ConfigTag(tag), *callbacks],
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


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    """Ranks a trainer config will use (devices x nodes); -1/"auto" devices count all GPUs."""
    devices = trainer_cfg.get("devices", 1)
    if devices in (-1, "auto"):
        devices = max(1, torch.cuda.device_count()) if trainer_cfg.get("accelerator") != "cpu" else 1
    elif isinstance(devices, (list, tuple)):
        devices = len(devices)
    return int(devices) * int(trainer_cfg.get("num_nodes", 1))
