"""Stage-2 task losses: cross-entropy with an ignore index for segmentation, BCE + IoU for SOD,
FCOS's own losses for detection (`pipeline/models/detection.py`).

SOD's loss pairs a per-pixel term (BCE) with a per-image region term (soft IoU, as in BASNet):
BCE alone is dominated by the large, easy background, while IoU scores the object's overlap
as a whole, whatever its size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.detection import detection_loss


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Mean cross-entropy over labelled pixels: (B, K, H, W) logits, (B, H, W) class ids.

    Sum / count rather than `reduction="mean"`, which is 0/0 = NaN when a batch has no
    labelled pixel (possible with a small label budget and crops); this gives 0 with a gradient.
    """
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)


def soft_iou_loss(logits: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - sum(p*g) / sum(p + g - p*g) per image, mean over images (p = sigmoid(logits), g in [0, 1]).

    The sums are a differentiable intersection and union over the image's pixels; `eps` in
    both keeps an empty target predicted empty at 0 loss instead of 0/0.
    """
    p = torch.sigmoid(logits).flatten(1)
    g = target.reshape_as(logits).to(p.dtype).flatten(1)
    intersection = (p * g).sum(dim=1)
    union = (p + g - p * g).sum(dim=1)
    return (1 - (intersection + eps) / (union + eps)).mean()


def sod_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE-with-logits + soft IoU; logits (B, 1, H, W), target (B, 1, H, W) or (B, H, W) in [0, 1]."""
    target = target.reshape_as(logits).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target) + soft_iou_loss(logits, target)


LOSSES = {"segmentation": segmentation_loss, "sod": sod_loss, "detection": detection_loss}


def build_loss(kind: str, **kwargs) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss for a task as `loss(logits, target)`; kwargs (e.g. ignore_index) are bound."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return partial(LOSSES[kind], **kwargs)
