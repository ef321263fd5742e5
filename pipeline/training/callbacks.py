"""Lightning callbacks shared by every training stage."""

from __future__ import annotations

import csv
import io
import random
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from pipeline.data.loading import TrainStream


class SetStreamEpoch(Callback):
    """Call `set_epoch` on the training stream at every epoch start.

    Lightning only does this for samplers; our streams are iterable datasets whose dataloader
    workers are rebuilt from a pickled copy each epoch, so without it every epoch would replay
    the first epoch's shard draws. (The first epoch of a run, fresh or resumed, is set before
    `fit`: Lightning creates its iterator before any hook runs.)
    """

    def __init__(self, stream: TrainStream):
        self.stream = stream

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stream.set_epoch(trainer.current_epoch)


class SeedRanksApart(Callback):
    """Give every rank > 0 its own random streams (torch, numpy, random) at fit start.

    Every rank of a stage runs the same script with the same seed, so without this the
    in-process randomness (crops and flips with `num_workers: 0`, dropout, modality dropout)
    would be identical on all N ranks: N GPUs would train on N copies of one augmentation.
    It runs after the model is built and wrapped (DDP has broadcast rank 0's weights), and
    rank 0 keeps its stream, so a one-process run is unchanged. (Dataloader workers are seeded
    per rank by Lightning already; masks follow the image key, `keyed_masks`.)
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        if rank == 0:
            return
        seed = (torch.initial_seed() + 1_000_003 * rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class NonFiniteLoss(RuntimeError):
    """A training loss became NaN or infinite; the run stopped before the optimizer step."""


class StopOnNonFiniteLoss(Callback):
    """Stop a run at the first NaN/inf loss, before the optimizer step corrupts the weights.

    Checked before every backward pass; under DDP the decision is reduced over ranks, so every
    rank stops at the same step instead of the others waiting forever in the gradient
    all-reduce. Raising here skips the step's checkpoint, so `last.ckpt` stays the last good one.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        terms = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if isinstance(v, Tensor) and v.numel() == 1 and not torch.isfinite(v)}
        named = ", ".join(f"{k}={v}" for k, v in terms.items()) or f"loss={float(loss)}"
        where = "on this rank" if not finite else f"on another rank (this rank's loss is {float(loss):.6g})"
        raise NonFiniteLoss(
            f"non-finite training loss at step {trainer.global_step} (epoch {trainer.current_epoch}) {where}: "
            f"{named}. Stopped before the optimizer step; the last checkpoint written before it is kept. "
            "Lower the learning rate or use full precision, then re-run (a changed configuration starts afresh).")


class LossCurve(Callback):
    """Collects the logged training losses per step for a `dvc plots` CSV.

    The rows live in the callback's state, which Lightning stores in checkpoints, so a resumed
    run keeps the curve of the steps before the interruption. Also measures training time.
    """

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.rows: list[dict[str, float]] = []
        self.seconds = 0.0
        self._started: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        row.update({k: round(float(metrics[k]), 6) for k in self.keys if k in metrics})
        self.rows.append(row)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._add_elapsed()

    def _add_elapsed(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        self._add_elapsed()
        return {"rows": self.rows, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])
        self.seconds = float(state_dict["seconds"])

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["step", "epoch", *self.keys], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        return buffer.getvalue()

    def first_and_last(self, key: str) -> tuple[float, float] | None:
        """Mean of `key` over the first and the last 10% of steps (at least one step each):
        a noise-robust start/end of the curve."""
        values = [row[key] for row in self.rows if key in row]
        if not values:
            return None
        n = max(1, len(values) // 10)
        return sum(values[:n]) / n, sum(values[-n:]) / n


def curves_csv(curves: Mapping[Any, LossCurve], column: str) -> str:
    """Several runs' curves in one CSV for `dvc plots`, told apart by a leading `column`
    (e.g. the seed)."""
    keys = list(dict.fromkeys(key for curve in curves.values() for key in curve.keys))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[column, "step", "epoch", *keys], extrasaction="ignore")
    writer.writeheader()
    for name, curve in curves.items():
        writer.writerows({column: name, **row} for row in curve.rows)
    return buffer.getvalue()
