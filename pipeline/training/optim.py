"""The optimizer and learning-rate schedule every training phase uses.

AdamW over the trainable parameters only (the frozen encoder never reaches the optimizer, so
its state costs nothing), linear warm-up then cosine decay per optimizer step (lightly's
scheduler), so a run of any length gets the same shape of schedule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightly.utils.scheduler import CosineWarmupScheduler
from torch import nn


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1  # share of steps with linear LR warm-up, then cosine decay


def configure_adamw(parameters: Iterable[nn.Parameter], optim: OptimSettings, total_steps: int) -> dict[str, Any]:
    """What `LightningModule.configure_optimizers` returns: AdamW on the parameters that
    require gradients, stepped per batch through warm-up and cosine decay."""
    trainable = [p for p in parameters if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: no parameter requires gradients")
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
    total_steps = max(1, total_steps)
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=int(optim.warmup_fraction * total_steps),
                                      max_epochs=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
