"""Trainer plumbing: loggers from conf/logger, step counts, trainable-only checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import compose_params
from pipeline.training.callbacks import NonFiniteLoss
from pipeline.training.checkpointing import TrainableOnlyCheckpoint
from pipeline.training.trainer import (
    build_logger,
    build_trainer,
    config_hash,
    steps_per_epoch,
    training_scale,
    world_size,
)
from tests.conftest import REPO


def logger_config(name: str) -> dict:
    return yaml.safe_load(compose_params([f"logger={name}"], REPO / "conf"))["logger"]


def test_csv_logger_is_the_default(tmp_path):
    assert yaml.safe_load(compose_params([], REPO / "conf"))["logger"] == logger_config("csv")
    logger = build_logger(logger_config("csv"), tmp_path, "warmup-thermal")
    assert isinstance(logger, CSVLogger) and logger.save_dir == str(tmp_path) and logger.name == "warmup-thermal"
    assert build_logger(None, tmp_path, "x") is False


def test_wandb_logger_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = logger_config("wandb")
    assert config["mode"] == "offline"
    logger = build_logger(config, tmp_path, "joint-depth")
    assert isinstance(logger, WandbLogger)
    logger.log_metrics({"loss": 1.5}, step=1)
    logger.experiment.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "offline run written under the log dir"


@pytest.mark.parametrize(
    ("samples", "batch", "world", "workers", "accumulate", "expected"),
    [(160, 16, 1, 0, 1, 10), (160, 16, 1, 2, 1, 10), (100, 16, 1, 2, 1, 8), (100, 16, 2, 1, 1, 4), (160, 16, 1, 0, 3, 4)],
)
def test_steps_per_epoch_matches_what_the_loaders_yield(samples, batch, world, workers, accumulate, expected):
    # e.g. 100 samples over 2 workers: 50 each -> 4 batches each (16, 16, 16, 2) -> 8 batches
    assert steps_per_epoch(samples, batch, world, workers, accumulate) == expected


def test_world_size_counts_devices_and_nodes():
    assert world_size({"accelerator": "cpu", "devices": 1}) == 1
    assert world_size({"accelerator": "gpu", "devices": 4, "num_nodes": 2}) == 8
    assert world_size({"accelerator": "gpu", "devices": [0, 1]}) == 2


def test_config_hash_is_stable_and_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


class Tiny(TrainableOnlyCheckpoint, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.trained = nn.Linear(4, 1)
        self.register_buffer("ema", torch.zeros(1))


def test_checkpoints_hold_trainable_tensors_and_buffers_only():
    module = Tiny()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert sorted(checkpoint["state_dict"]) == ["ema", "trained.bias", "trained.weight"]
    module.on_load_checkpoint(checkpoint)  # complete: accepted
    del checkpoint["state_dict"]["trained.bias"]
    with pytest.raises(RuntimeError, match="trained.bias"):
        module.on_load_checkpoint(checkpoint)
    assert module.strict_loading is False


class Diverging(L.LightningModule):
    """Regression whose `loss_extra` term turns NaN at one step (as a diverging run's would)."""

    def __init__(self, nan_at_step: int):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.nan_at_step = nan_at_step

    def training_step(self, batch, batch_idx):
        fit = self.layer(batch[0]).pow(2).mean()
        extra = fit * 0 + (float("nan") if self.global_step == self.nan_at_step else 0.0)
        self.log("loss_fit", fit)
        self.log("loss_extra", extra)
        return fit + extra

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_non_finite_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = build_trainer({"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                             "enable_model_summary": False}, None, max_epochs=1, run_name="run", log_dir=tmp_path,
                            checkpoint_dir=tmp_path / "ckpt", checkpoint_every_n_steps=2, tag="t")
    module = Diverging(nan_at_step=3)
    data = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2)
    with pytest.raises(NonFiniteLoss, match=r"at step 3 \(epoch 0\) on this rank: loss_extra=nan"):
        trainer.fit(module, data)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the NaN step never ran
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert not trainer.state.finished  # so fit_resumable keeps the checkpoint for a resumed run


def test_training_scale_records_how_the_run_was_spread(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert training_scale(trainer, 8) == {
        "world_size": 1, "num_nodes": 1, "devices_per_node": 1, "per_device_batch": 8, "accumulate_grad_batches": 2,
        "effective_batch": 16, "precision": "32-true", "devices": {"cpu": [0]}}
