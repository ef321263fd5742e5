"""Optimizers and schedules from config: torch's classes by Hydra `instantiate`, the schedules'
formulas step by step, parameter groups by prefix, and gradient clipping inside Lightning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.training.optim import ConfiguredOptimization, OptimSettings, configure_optimizer

LR = 0.1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4).requires_grad_(False)  # frozen: never reaches the optimizer
        self.decoder = nn.Linear(4, 2)
        self.head = nn.Linear(2, 1)


def lrs(optim: OptimSettings, steps: int) -> list[float]:
    configured = configure_optimizer(Net(), optim, steps)
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def settings(**changes) -> OptimSettings:
    return OptimSettings(optimizer={"_target_": "torch.optim.SGD", "lr": LR}, **changes)


def test_warmup_then_cosine():
    seen = lrs(settings(schedule="cosine", warmup_fraction=0.2), 10)  # 2 warm-up steps, 8 of cosine
    assert seen[:3] == pytest.approx([LR / 3, 2 * LR / 3, LR])
    assert seen[2:] == pytest.approx([LR * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(8)])


def test_poly_step_and_constant_follow_their_formulas():
    assert lrs(settings(schedule="poly", power=0.9, warmup_fraction=0.0), 10) == pytest.approx(
        [LR * (1 - t / 10) ** 0.9 for t in range(10)])
    assert lrs(settings(schedule="step", milestones=[0.5], gamma=0.1, warmup_fraction=0.0), 10) == pytest.approx(
        [LR] * 5 + [LR / 10] * 5)  # the release of IV-tuning on VT5000: x0.1 halfway
    assert lrs(settings(schedule="constant", warmup_fraction=0.0), 4) == pytest.approx([LR] * 4)


def test_any_torch_optimizer_with_groups_by_prefix():
    optim = OptimSettings(optimizer={"_target_": "torch.optim.SGD", "lr": LR, "momentum": 0.9, "weight_decay": 1e-2},
                          param_groups={"decoder": {"lr": 1e-3}})
    optimizer = configure_optimizer(Net(), optim, 4)["optimizer"]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    decoder, rest = optimizer.param_groups
    assert decoder["lr"] == 1e-3 and rest["lr"] == LR and decoder["weight_decay"] == rest["weight_decay"] == 1e-2
    assert sum(p.numel() for p in decoder["params"]) == 10 and sum(p.numel() for p in rest["params"]) == 3
    adam = OptimSettings(optimizer={"_target_": "torch.optim.Adam", "lr": 5e-5, "betas": [0.9, 0.99]})
    assert configure_optimizer(Net(), adam, 4)["optimizer"].defaults["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="no trainable parameter starts with"):
        configure_optimizer(Net(), settings(param_groups={"encoder": {"lr": 1.0}}), 4)
    with pytest.raises(ValueError, match="schedule"):
        settings(schedule="exponential")


class Clipped(ConfiguredOptimization, L.LightningModule):
    def __init__(self, clip: float | None):
        super().__init__()
        self.net = Net()
        self.optim, self.total_steps = settings(gradient_clip_val=clip, warmup_fraction=0.0), 1
        self.norms: list[float] = []

    def training_step(self, batch, batch_idx):
        self.before = [p.detach().clone() for p in self.parameters() if p.requires_grad]
        return 1e3 * self.net.head(self.net.decoder(batch[0])).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx):  # plain SGD: the step is lr x the clipped gradient
        after = [p.detach() for p in self.parameters() if p.requires_grad]
        self.norms.append(float(torch.stack([(a - b).norm() for a, b in zip(after, self.before)]).norm()) / LR)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradient_clipping_bounds_the_global_norm(clip):
    module = Clipped(clip)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(torch.ones(2, 4)), batch_size=2))
    assert (module.norms[0] <= 0.5 + 1e-6) == (clip is not None)
