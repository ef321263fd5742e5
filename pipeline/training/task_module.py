"""The Lightning module of Stage-2 fine-tuning: one task model, its loss, the configured optimiser on what trains."""

from __future__ import annotations

import lightning as L
from torch import Tensor

from pipeline.methods.stage2 import TaskModel
from pipeline.models.task_losses import build_loss
from pipeline.training.checkpointing import TrainableOnlyCheckpoint
from pipeline.training.optim import ConfiguredOptimization, OptimSettings
from pipeline.training.task_data import SEGMENTATION


class TaskTraining(ConfiguredOptimization, TrainableOnlyCheckpoint, L.LightningModule):
    """Checkpoints hold only trainable tensors (prompts, fusion, decoder, task adapters); the
    frozen encoder and modality LoRAs come from their own files when a run is rebuilt."""

    def __init__(self, model: TaskModel, *, head: str, ignore_index: int, total_steps: int, optim: OptimSettings):
        super().__init__()
        self.model = model
        self.loss = build_loss(head, **({"ignore_index": ignore_index} if head == SEGMENTATION else {}))
        self.total_steps = total_steps
        self.optim = optim

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self.model({stream: batch[stream] for stream in self.model.streams})
        # a deeply supervised decoder returns (final, *side outputs): each is trained with the loss
        outputs = logits if isinstance(logits, tuple) else (logits,)
        loss = sum(self.loss(output, batch["target"]) for output in outputs)
        self.log("loss", loss, prog_bar=True, batch_size=len(batch[self.model.streams[0]]))
        return loss

