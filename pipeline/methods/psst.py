"""PSST (Progressive Self-Supervised Tuning): the parts that are new, written once.

* `PSSTNetwork`: the student — frozen encoder + LoRA + mask token, MAE decoder, DINO head.
* `EMATeacher`: EMA copies of the student's trainable encoder/head tensors, run through the
  student's *own* modules with `torch.func.functional_call`, so the frozen encoder exists once.
* `unit_weights` / `ErrorWeightedPatchLoss`: patch-level consistency on masked units, each unit
  weighted by w_i = exp(alpha * e_i) / sum_j exp(alpha * e_j) over the image's masked units,
  e_i its detached MAE error. Patches the RGB prior reconstructs worst get the most weight;
  alpha = 0 is the uniform iBOT patch loss.
* `StepCenteredDINOLoss`: lightly's DINO image loss, its centre moved once per optimizer step.
* `reconstruction_scores` / `select_top_fraction`: the high-structural-complexity subset.

The DINO image loss, the projection head, the centring and the schedules come from lightly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.center import Center, center_mean, center_momentum
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.models.backbone import Backbone
from pipeline.models.lora import LoraSettings, add_lora
from pipeline.models.mae_decoder import MAEDecoder, reconstruction_loss
from pipeline.models.masking import MASK_UNIT, MaskedEncoder

MODES = ("none", "mae", "mae+dino", "full")


@dataclass(frozen=True)
class HeadSettings:
    """DINO projection head size (lightly's DINOProjectionHead)."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    output_dim: int = 65536


class PSSTNetwork(nn.Module):
    """Student network: `encoder` (frozen backbone + LoRA + mask token), `decoder`, `head`.

    The PeftModel that owns the LoRA layers is kept outside the module tree (`self.peft`): it
    wraps the same timm model the backbone holds, and registering it too would list every
    encoder tensor twice in `state_dict`.
    """

    def __init__(self, backbone: Backbone, lora: LoraSettings, decoder_dim: int = 128,
                 head: HeadSettings = HeadSettings()):
        super().__init__()
        self.__dict__["peft"] = add_lora(backbone, lora)
        self.encoder = MaskedEncoder(backbone)
        self.decoder = MAEDecoder(backbone.channels, dim=decoder_dim, unit=self.encoder.unit)
        self.head = DINOProjectionHead(backbone.channels[-1], head.hidden_dim, head.bottleneck_dim, head.output_dim)

    @property
    def backbone(self) -> Backbone:
        return self.encoder.backbone

    def reconstruct(self, images: Tensor, mask: Tensor, normalize_targets: bool = True
                    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(masked-unit MSE, per-unit errors, encoder features) for masked images."""
        features = self.encoder(images, mask)
        loss, errors = reconstruction_loss(self.decoder(features), images, mask, self.encoder.unit, normalize_targets)
        return loss, errors, features

    def forward(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Head outputs for the image (pooled final-stage tokens, (B, K)) and for every
        final-stage token ((B, h, w, K)), from one encoder pass. (The teacher runs this.)"""
        tokens = self.encoder(images, mask)[-1].permute(0, 2, 3, 1)  # (B, h, w, C)
        return self.head(tokens.mean(dim=(1, 2))), self.head(tokens)

    def trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


class EMATeacher(nn.Module):
    """Exponential moving averages of chosen student parameters.

    The teacher owns no modules: `forward` runs the student's forward with the EMA tensors
    swapped in for those parameters (everything else, the frozen encoder included, is the
    student's own: no second copy).
    """

    def __init__(self, student: nn.Module, names: Iterable[str]):
        super().__init__()
        params = dict(student.named_parameters())
        self.names = sorted(names)
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise KeyError(f"EMA teacher: no student parameters {unknown[:3]}")
        for i, name in enumerate(self.names):  # buffers: saved in checkpoints, never optimised
            self.register_buffer(f"ema_{i}", params[name].detach().clone())

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"ema_{i}") for i, name in enumerate(self.names)}

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """ema <- momentum * ema + (1 - momentum) * student, for the tracked parameters only."""
        params = dict(student.named_parameters())
        ema = list(self.tensors().values())
        torch._foreach_lerp_(ema, [params[n].detach() for n in self.names], 1.0 - momentum)

    @torch.no_grad()
    def forward(self, student: nn.Module, *args, **kwargs):
        """`student(*args, **kwargs)` computed with the teacher's weights, in eval mode: no
        dropout (LoRA dropout included) and no stochastic depth in the targets. The student's
        train/eval flags are restored afterwards, module by module."""
        modes = [(module, module.training) for module in student.modules()]
        student.eval()
        try:
            return functional_call(student, self.tensors(), args, kwargs, strict=False, tie_weights=False)
        finally:
            for module, training in modes:
                module.training = training


def teacher_parameter_names(network: PSSTNetwork) -> list[str]:
    """The student tensors the teacher averages: trainable encoder (LoRA) and head tensors.
    The mask token and MAE decoder take no part in the teacher's forward."""
    return [
        n for n, p in network.named_parameters()
        if p.requires_grad and (n.startswith("encoder.backbone.") or n.startswith("head."))
    ]


def unit_weights(errors: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """w = softmax(alpha * e) over each image's masked units, 0 on visible units (B, h, w)."""
    logits = (alpha * errors.detach()).masked_fill(~mask, float("-inf")).flatten(1)
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # an image with no masked unit: all 0
    return weights.reshape(errors.shape)


class BatchCenters:
    """The batch centres of one optimizer step's forwards, applied together.

    lightly moves a DINO centre inside every forward, so with `accumulate_grad_batches=k` the
    centre would take k momentum steps per optimizer step and each micro-batch would be centred
    differently from the one big batch it stands for. Recording each forward's batch centre
    (lightly's `center_mean`, which already averages over DDP ranks) and applying their mean
    once makes 1 x 2b, 2 ranks x b and 1 x b accumulated twice move the centre alike.
    """

    def __init__(self) -> None:
        self.pending: list[Tensor] = []

    def record(self, batch_center: Tensor) -> None:
        self.pending.append(batch_center)

    def moved(self, center: Tensor, momentum: float) -> Tensor:
        """`center` after one momentum step towards the mean recorded centre (unchanged if none)."""
        if not self.pending:
            return center
        batch_center = torch.stack(self.pending).mean(0)
        self.pending.clear()
        return center_momentum(center=center, batch_center=batch_center, momentum=momentum)


class StepCenteredDINOLoss(DINOLoss):
    """lightly's `DINOLoss` whose centre moves in `step_center()` (once per optimizer step)
    instead of inside every forward (`BatchCenters`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._centers = BatchCenters()

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:  # called by DINOLoss.forward
        self._centers.record(self._center_fn(x=teacher_out, dim=(0, 1)))

    @torch.no_grad()
    def step_center(self) -> None:
        self.center.data = self._centers.moved(self.center, self.center_momentum)


class ErrorWeightedPatchLoss(nn.Module):
    """iBOT-style patch consistency with per-unit weights.

    Per masked unit: cross-entropy between the teacher's centred, sharpened softmax and the
    student's log-softmax; summed with the unit's weight, averaged over images. With the uniform
    weights 1/num_masked (alpha = 0) this is lightly's `IBOTPatchLoss`. Its centre (lightly's
    `Center`) moves in `step_center()`, once per optimizer step (`BatchCenters`).
    """

    def __init__(self, output_dim: int, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center = Center(size=(1, output_dim), mode="mean", momentum=center_momentum)
        self._centers = BatchCenters()

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor, weights: Tensor,
                teacher_temp: float | None = None) -> Tensor:
        """`teacher_out`, `student_out`: (N, K) outputs of the N masked units, in `mask` order;
        `mask`, `weights`: (B, h, w)."""
        temperature = teacher_temp if teacher_temp is not None else self.teacher_temp
        teacher = F.softmax((teacher_out - self.center.value) / temperature, dim=-1)
        student = F.log_softmax(student_out / self.student_temp, dim=-1)
        cross_entropy = -(teacher * student).sum(dim=-1)
        loss = (cross_entropy * weights[mask]).sum() / mask.shape[0]
        self._centers.record(center_mean(teacher_out.detach(), self.center.dim))
        return loss

    @torch.no_grad()
    def step_center(self) -> None:
        self.center.center = self._centers.moved(self.center.value, self.center.momentum)


@torch.no_grad()
def reconstruction_scores(network: PSSTNetwork, images: Tensor, image_masks: Sequence[Tensor], *,
                          score: str = "variance", normalize_targets: bool = True) -> Tensor:
    """One score per image from its MAE errors under each of `image_masks` ((B, h, w) each).

    `variance`: variance of the per-unit errors of all masked units over all masks (how
    unevenly the RGB prior explains the image: structural complexity); `mean`: their mean.
    """
    if score not in ("variance", "mean"):
        raise ValueError(f"unknown score {score!r}; use variance or mean")
    errors, masks = [], []
    for mask in image_masks:
        _, unit_errors, _ = network.reconstruct(images, mask, normalize_targets)
        errors.append(unit_errors.flatten(1))
        masks.append(mask.flatten(1))
    errors, masks = torch.cat(errors, 1), torch.cat(masks, 1)
    count = masks.sum(1).clamp_min(1)
    mean = (errors * masks).sum(1) / count
    if score == "mean":
        return mean
    return (((errors - mean[:, None]) ** 2) * masks).sum(1) / (count - 1).clamp_min(1)


@torch.no_grad()
def probe_loss(network: PSSTNetwork, images: Tensor, masks: Sequence[Tensor], normalize_targets: bool = True) -> float:
    """MAE loss on a fixed set of images and masks: a noise-free before/after measure of the
    warm-up (training losses move with every batch's content)."""
    was_training = network.training
    network.eval()
    losses = [network.reconstruct(images, mask, normalize_targets)[0].item() for mask in masks]
    network.train(was_training)
    return sum(losses) / len(losses)


def select_top_fraction(scores: Mapping[str, float], fraction: float) -> list[str]:
    """Keys of the ceil(fraction * n) highest scores (ties broken by key, so it is stable)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"selection fraction must be in (0, 1], got {fraction}")
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    return ranked[: max(1, math.ceil(fraction * len(ranked)))]


def mask_grid(image_size: Sequence[int]) -> tuple[int, int]:
    return image_size[0] // MASK_UNIT, image_size[1] // MASK_UNIT
