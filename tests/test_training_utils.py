"""Trainer plumbing: loggers from conf/logger, step counts, trainable-only checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn

from pipeline.config import compose_params
from pipeline.training.checkpointing import TrainableOnlyCheckpoint
from pipeline.training.trainer import build_logger, config_hash, steps_per_epoch, world_size
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
