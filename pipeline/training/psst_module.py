"""Lightning modules for the two PSST training phases.

`MAEWarmup`: masked units -> MAE loss; trains LoRA, mask token and decoder.
`JointTraining`: L = lambda * L_MAE + L_i-con + L_p-con with an EMA teacher over the shared
frozen encoder. Teacher views are the unmasked global crops; the student sees the same global
crops masked (MAE + image + patch terms) and the local crops unmasked (image term).
`alpha = 0` gives the unweighted `mae+dino` ablation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor

from pipeline.methods.psst import (
    EMATeacher,
    ErrorWeightedPatchLoss,
    PSSTNetwork,
    StepCenteredDINOLoss,
    mask_grid,
    teacher_parameter_names,
    unit_weights,
)
from pipeline.models.masking import keyed_masks
from pipeline.training.checkpointing import TrainableOnlyCheckpoint
from pipeline.training.optim import ConfiguredOptimization, OptimSettings


@dataclass(frozen=True)
class JointSettings:
    lambda_mae: float = 1.0
    alpha: float = 1.0  # error-weighting sharpness; 0 = uniform (mae+dino ablation)
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_fraction: float = 0.3
    student_temp: float = 0.1
    center_momentum: float = 0.9
    ema_start: float = 0.996
    ema_end: float = 1.0


class _PSSTPhase(ConfiguredOptimization, TrainableOnlyCheckpoint, L.LightningModule):
    def __init__(self, network: PSSTNetwork, *, total_steps: int, optim: OptimSettings, mask_ratio: float,
                 normalize_targets: bool, seed: int):
        super().__init__()
        self.network = network
        self.total_steps = max(1, total_steps)
        self.optim = optim
        self.mask_ratio = mask_ratio
        self.normalize_targets = normalize_targets
        self.seed = seed

    def mask_for(self, keys: list[str], images: Tensor) -> Tensor:
        """Masks of `images` (named by `keys`) at this optimizer step: a new mask every time an
        image is drawn again, the same whatever rank or micro-batch of the step it lands in."""
        return keyed_masks(keys, mask_grid(images.shape[-2:]), self.mask_ratio, self.seed, self.global_step,
                           images.device)



class MAEWarmup(_PSSTPhase):
    """MAE warm-up: reconstruct masked units of the modality from the LoRA-adapted encoder."""

    def setup(self, stage: str) -> None:
        # The DINO head belongs to the joint phase: frozen while this phase trains, so neither the
        # optimizer nor DDP (which refuses trainable parameters that get no gradient) sees it.
        self._head_trainable = [p for p in self.network.head.parameters() if p.requires_grad]
        for parameter in self._head_trainable:
            parameter.requires_grad_(False)

    def teardown(self, stage: str) -> None:
        # Exactly the head's trainable tensors again (not, e.g., lightly's frozen weight-norm
        # scale): the warm-up's output keeps the head for the joint phase.
        for parameter in getattr(self, "_head_trainable", []):
            parameter.requires_grad_(True)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        loss, _, _ = self.network.reconstruct(images, self.mask_for(batch["key"], images), self.normalize_targets)
        self.log("loss_mae", loss, prog_bar=True, batch_size=images.shape[0])
        return loss


class JointTraining(_PSSTPhase):
    """MAE + DINO self-distillation with error-weighted patch consistency."""

    def __init__(self, network: PSSTNetwork, *, joint: JointSettings, **kwargs):
        super().__init__(network, **kwargs)
        self.joint = joint
        self.teacher = EMATeacher(network, teacher_parameter_names(network))
        output_dim = network.head.last_layer.out_features
        self.image_loss = StepCenteredDINOLoss(output_dim, teacher_temp=joint.teacher_temp, student_temp=joint.student_temp,
                                   center_momentum=joint.center_momentum)
        self.patch_loss = ErrorWeightedPatchLoss(output_dim, joint.teacher_temp, joint.student_temp,
                                                 joint.center_momentum)

    def teacher_temp(self) -> float:
        """Linear warm-up of the teacher temperature over the first steps (as DINO)."""
        steps = max(1, int(self.joint.warmup_teacher_temp_fraction * self.total_steps))
        progress = min(1.0, self.global_step / steps)
        return self.joint.warmup_teacher_temp + progress * (self.joint.teacher_temp - self.joint.warmup_teacher_temp)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        global_views = batch["global"]  # (B, G, 3, H, W)
        batch_size = global_views.shape[0]
        images = global_views.flatten(0, 1)  # view-major order within each sample
        temperature = self.teacher_temp()

        teacher_image, teacher_patch = self.teacher(self.network, images)  # no grad, unmasked

        views = global_views.shape[1]
        mask = self.mask_for([f"{key}/global{v}" for key in batch["key"] for v in range(views)], images)
        mae, errors, features = self.network.reconstruct(images, mask, self.normalize_targets)
        tokens = features[-1].permute(0, 2, 3, 1)
        student_image = self.network.head(tokens.mean(dim=(1, 2)))
        student_patch = self.network.head(tokens[mask])

        def per_view(x: Tensor) -> list[Tensor]:  # (B*V, K) -> V tensors of (B, K)
            return list(x.reshape(batch_size, -1, x.shape[-1]).unbind(1))

        student_views = per_view(student_image)
        if "local" in batch:
            local = batch["local"].flatten(0, 1)
            student_views += per_view(self.network(local)[0])
        image_term = self.image_loss(per_view(teacher_image), student_views, teacher_temp=temperature)
        weights = unit_weights(errors, mask, self.joint.alpha)
        patch_term = self.patch_loss(teacher_patch[mask], student_patch, mask, weights, teacher_temp=temperature)
        loss = self.joint.lambda_mae * mae + image_term + patch_term

        logged = {"loss": loss, "loss_mae": mae, "loss_image": image_term, "loss_patch": patch_term}
        self.log_dict(logged, prog_bar=True, batch_size=batch_size)
        self.log("weight_max", weights.amax(dim=(1, 2)).mean(), batch_size=batch_size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The teacher and both DINO centres follow the student once per optimizer step (after
        # `global_step` counts it), not per micro-batch: with gradient accumulation they must
        # not move k times faster.
        super().optimizer_step(*args, **kwargs)
        momentum = cosine_schedule(self.global_step, self.total_steps, self.joint.ema_start, self.joint.ema_end)
        self.teacher.update(self.network, momentum)
        self.image_loss.step_center()
        self.patch_loss.step_center()
