"""The optimizer, learning-rate schedule and gradient clipping of a training phase, from config.

Every phase's `optim` section, e.g.

    optim:
      optimizer: {_target_: torch.optim.AdamW, lr: 3.0e-4, weight_decay: 0.05}  # any torch.optim class
      schedule: cosine          # cosine | poly | step | constant, after the warm-up
      warmup_fraction: 0.1      # linear warm-up over this share of the optimizer steps
      power: 0.9                # poly: (1 - t/T)^power
      milestones: [0.5]         # step: the LR is multiplied by gamma at these fractions of the run
      gamma: 0.1
      param_groups: {decoder: {lr: 1.0e-3}}  # optimizer options per parameter-name prefix
      gradient_clip_val: null   # clip the global gradient norm before each optimizer step

The optimizer and the schedules are torch's own classes, built by Hydra `instantiate` (the
schedules are stepped per optimizer step, so a run of any length gets the same shape). Only
trainable parameters reach the optimizer: the frozen encoder's state costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

SCHEDULES = {
    "cosine": "torch.optim.lr_scheduler.CosineAnnealingLR",
    "poly": "torch.optim.lr_scheduler.PolynomialLR",
    "step": "torch.optim.lr_scheduler.MultiStepLR",
    "constant": "torch.optim.lr_scheduler.ConstantLR",
}


@dataclass(frozen=True)
class OptimSettings:
    """A phase's `optim` section (module docstring)."""

    optimizer: Mapping[str, Any] = field(default_factory=lambda: {
        "_target_": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 0.05})
    schedule: str = "cosine"
    warmup_fraction: float = 0.1
    power: float = 0.9
    milestones: Sequence[float] = (0.5,)
    gamma: float = 0.1
    param_groups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    gradient_clip_val: float | None = None

    def __post_init__(self) -> None:
        if "_target_" not in self.optimizer:
            raise ValueError(f"optim.optimizer needs a _target_ (e.g. torch.optim.AdamW), got {dict(self.optimizer)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @property
    def lr(self) -> float:
        return float(self.optimizer["lr"])


def parameter_groups(named: Iterable[tuple[str, nn.Parameter]], groups: Mapping[str, Mapping[str, Any]]
                     ) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one per `groups` prefix (its options,
    e.g. its own lr), the rest in a default group. A prefix that matches nothing is an error."""
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: no parameter requires gradients")
    chosen: dict[str, list[nn.Parameter]] = {prefix: [] for prefix in groups}
    rest = []
    for name, parameter in trainable:
        prefix = next((p for p in groups if name.startswith(p)), None)
        (chosen[prefix] if prefix is not None else rest).append(parameter)
    empty = [prefix for prefix, params in chosen.items() if not params]
    if empty:
        raise ValueError(f"optim.param_groups {empty}: no trainable parameter starts with that prefix")
    built = [{"params": params, **dict(groups[prefix])} for prefix, params in chosen.items()]
    return built + ([{"params": rest}] if rest else [])


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSettings, total_steps: int):
    """Linear warm-up (torch `LinearLR`) then the configured schedule, over `total_steps`."""
    total_steps = max(1, total_steps)
    warmup = int(optim.warmup_fraction * total_steps)
    steps = total_steps - warmup
    options = {
        "cosine": {"T_max": steps},
        "poly": {"total_iters": steps, "power": optim.power},
        "step": {"milestones": [max(0, round(f * total_steps) - warmup) for f in optim.milestones],
                 "gamma": optim.gamma},
        "constant": {"factor": 1.0, "total_iters": 0},
    }[optim.schedule]
    main = instantiate({"_target_": SCHEDULES[optim.schedule], **options}, optimizer)
    if warmup == 0:
        return main
    ramp = instantiate({"_target_": "torch.optim.lr_scheduler.LinearLR", "start_factor": 1.0 / (warmup + 1),
                        "end_factor": 1.0, "total_iters": warmup}, optimizer)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def configure_optimizer(module: nn.Module, optim: OptimSettings, total_steps: int) -> dict[str, Any]:
    """What `LightningModule.configure_optimizers` returns: the configured optimizer over the
    trainable parameters (grouped), stepped per batch through the schedule."""
    groups = parameter_groups(module.named_parameters(), optim.param_groups)
    optimizer = instantiate({**optim.optimizer, "_convert_": "all"}, groups)
    scheduler = build_scheduler(optimizer, optim, total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ConfiguredOptimization:
    """Mixin for the training modules: `configure_optimizers` from `self.optim` and
    `self.total_steps`, and the configured gradient clipping (Lightning's hook)."""

    optim: OptimSettings
    total_steps: int

    def configure_optimizers(self):
        return configure_optimizer(self, self.optim, self.total_steps)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        value = self.optim.gradient_clip_val if self.optim.gradient_clip_val is not None else gradient_clip_val
        if value is not None:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm="norm")
