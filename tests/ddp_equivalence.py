"""Train each real module for 4 optimizer steps of a global batch of 4 in one layout (ranks x
per-rank batch x accumulation) and save every tensor training changes; run by
tests/test_ddp_equivalence.py, which compares the layouts.

Usage: python -m tests.ddp_equivalence <devices> <batch> <accumulate> <out_dir> <lora_dir>
(writes <out_dir>/<phase>.safetensors for the phases warmup, joint, tp_mome)

The data are fixed tensors in a fixed order: with our own unshuffled sampler (Lightning always
shuffles the DistributedSampler it injects for training; the real streams are iterable and
need none), optimizer step s sees samples 4s..4s+3 in every layout. Dropout is off, so what
differs between layouts is only how the work is spread: DDP's gradient all-reduce, gradient
accumulation, the DINO centres' reduction over ranks and micro-batches, masks keyed by image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.artifacts import trainable_tensors
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.models.backbone import create_backbone
from pipeline.training.callbacks import SeedRanksApart
from pipeline.training.optim import OptimSettings
from pipeline.training.psst import build_network
from pipeline.training.psst_module import JointSettings, JointTraining, MAEWarmup
from pipeline.training.task_module import TaskTraining
from tests.conftest import smoke_params

STEPS, GLOBAL_BATCH, SIZE, CLASSES = 4, 4, 64, 7
# SGD with momentum, constant LR: linear in the gradients, so the layouts' rounding differences stay
# rounding-sized. (Adam divides each gradient by its own running scale: a parameter whose gradient
# is rounding noise, e.g. a bias in front of a normalisation, takes lr-sized steps of that noise.)
# Learning rates that move the trained tensors by ~0.1-1 in 4 steps (the DINO head's gradients are large).
LR = {"warmup": 0.5, "joint": 1e-3, "tp_mome": 0.5}


def optim(phase: str) -> OptimSettings:
    return OptimSettings(optimizer={"_target_": "torch.optim.SGD", "lr": LR[phase], "momentum": 0.9},
                         schedule="constant", warmup_fraction=0.0)


class FixedSamples(Dataset):
    def __init__(self, phase: str):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(STEPS * GLOBAL_BATCH):
            if phase == "warmup":
                item = {"image": torch.randn(3, SIZE, SIZE, generator=g)}
            elif phase == "joint":
                item = {"global": torch.randn(2, 3, SIZE, SIZE, generator=g),
                        "local": torch.randn(1, 3, SIZE // 2, SIZE // 2, generator=g)}
            else:  # no ignored pixels: every micro-batch's mean loss weighs its pixels alike
                item = {"rgb": torch.randn(3, SIZE, SIZE, generator=g), "thermal": torch.randn(3, SIZE, SIZE, generator=g),
                        "target": torch.randint(0, CLASSES, (SIZE, SIZE), generator=g)}
            self.items.append({**item, "key": f"sample{i:03d}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class InOrder(L.LightningDataModule):
    """Rank r of R gets samples r, r+R, ...: step s's global batch is samples 4s..4s+3."""

    def __init__(self, phase: str, batch_size: int):
        super().__init__()
        self.data, self.batch_size = FixedSamples(phase), batch_size

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


def build_module(phase: str, lora_dir: str | None) -> L.LightningModule:
    params = smoke_params()
    psst = params["psst"]
    common = {"total_steps": STEPS, "optim": optim(phase)}
    if phase in ("warmup", "joint"):
        network = build_network(params, psst)
        masking = {"mask_ratio": psst["mask_ratio"], "normalize_targets": True, "seed": 0}
        if phase == "warmup":
            return MAEWarmup(network, **common, **masking)
        return JointTraining(network, joint=JointSettings(**psst["joint"]["loss"]), **common, **masking)
    # decoder: GroupNorm (BatchNorm would normalise per rank)
    L.seed_everything(0, verbose=False)
    method = MethodSettings.from_config(params["methods"]["tp_mome"])
    model = TaskModel(create_backbone(**params["backbone"]), ["rgb", "thermal"], method, head="segmentation",
                      num_classes=CLASSES, decoder={"embed_dim": 64, "dropout": 0.0, "norm": "group"},
                      lora_dirs={"thermal": Path(lora_dir)})
    return TaskTraining(model, head="segmentation", ignore_index=255, **common)


def trained_tensors(module: L.LightningModule) -> dict[str, Tensor]:
    """Every tensor training changes: trainable parameters (+ their modules' buffers), and for
    the joint phase the EMA teacher and both DINO centres."""
    tensors = dict(trainable_tensors(module))
    if isinstance(module, JointTraining):
        tensors.update({f"teacher.{k}": v for k, v in module.teacher.tensors().items()})
        tensors["image_center"], tensors["patch_center"] = module.image_loss.center, module.patch_loss.center.value
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


PHASES = ("warmup", "joint", "tp_mome")


def train_phase(phase: str, devices: int, batch_size: int, accumulate: int, out: Path, lora_dir: str) -> None:
    module = build_module(phase, lora_dir)
    before = trained_tensors(module)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=STEPS, accumulate_grad_batches=accumulate, use_distributed_sampler=False,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SeedRanksApart()])
    trainer.fit(module, datamodule=InOrder(phase, batch_size))
    if trainer.is_global_zero:
        after = trained_tensors(module)
        save_file({**{f"after/{k}": v for k, v in after.items()}, **{f"before/{k}": v for k, v in before.items()}},
                  str(out / f"{phase}.safetensors"),
                  metadata={"world_size": str(trainer.world_size), "steps": str(trainer.global_step)})


if __name__ == "__main__":  # every phase in one launch: the processes start once per layout
    devices, batch, accumulate, out, lora = sys.argv[1:]
    for phase in PHASES:
        train_phase(phase, int(devices), int(batch), int(accumulate), Path(out), lora)
