"""A light decoder from the four feature maps to the pixels of every mask unit, and its loss.

The decoder projects each scale to a common width, pools it to the unit grid (stride 32),
sums, and predicts the unit's 32x32xC pixels with a 1x1 convolution followed by pixel shuffle
(SimMIM's head, fed by all scales so fine features take part). The loss is MSE on masked
units only; with `normalize_targets` each unit's target is standardised by its own mean and
variance (MAE's norm_pix_loss), which stresses structure over absolute intensity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class MAEDecoder(nn.Module):
    def __init__(self, channels: Sequence[int], dim: int = 128, unit: int = 32, out_chans: int = 3):
        super().__init__()
        self.unit = unit
        self.project = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in channels)
        self.head = nn.Sequential(nn.GELU(), nn.Conv2d(dim, unit * unit * out_chans, kernel_size=1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Four NCHW maps -> reconstructed image (B, C, H, W) at the input resolution."""
        grid = features[-1].shape[-2:]
        fused = sum(F.adaptive_avg_pool2d(p(f), grid) for p, f in zip(self.project, features, strict=True))
        return F.pixel_shuffle(self.head(fused), self.unit)


def unit_errors(prediction: Tensor, target: Tensor, unit: int = 32, normalize_targets: bool = True) -> Tensor:
    """Mean squared error per mask unit: (B, C, H, W) pairs -> (B, H/unit, W/unit)."""
    def to_units(x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, h, w, C*unit*unit)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // unit, unit, w // unit, unit)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // unit, w // unit, c * unit * unit)

    pred, tgt = to_units(prediction), to_units(target)
    if normalize_targets:
        mean, var = tgt.mean(dim=-1, keepdim=True), tgt.var(dim=-1, keepdim=True)
        tgt = (tgt - mean) / (var + 1e-6).sqrt()
    return ((pred - tgt) ** 2).mean(dim=-1)


def masked_mean(errors: Tensor, mask: Tensor) -> Tensor:
    """Mean of per-unit errors over masked units only (visible units do not count)."""
    mask = mask.to(errors.dtype)
    return (errors * mask).sum() / mask.sum().clamp_min(1.0)


def reconstruction_loss(
    prediction: Tensor, target: Tensor, mask: Tensor, unit: int = 32, normalize_targets: bool = True
) -> tuple[Tensor, Tensor]:
    """(loss over masked units, per-unit errors (B, h, w)); the errors feed PSST's weights."""
    errors = unit_errors(prediction, target, unit, normalize_targets)
    return masked_mean(errors, mask), errors

