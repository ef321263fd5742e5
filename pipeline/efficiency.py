"""Parameter counts at the seed paper's scale, without training (the report's efficiency section).

The demo's encoder is small, so its parameter totals say little about the method's cost at the
scale it is meant for. `paper_scale_parameters` builds the *same* modules at that scale (SAM 2
Hiera-B+, the paper's five downstream tasks with their streams and class counts, the method
of `paper_scale.method` as configured under `methods`) and counts, cumulatively over the
tasks: the frozen encoder once (each task's own copy when the method trains the encoder), each
modality LoRA once (shared by every task that reads the modality, counted by peft on the
encoder), and every task's own trainable parts. Nothing is trained or loaded: the encoder is
randomly initialised, which does not change a count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.data.types import RGB
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.models.backbone import create_backbone
from pipeline.models.lora import LoraSettings, add_lora, lora_parameters


def paper_scale_parameters(cfg: Mapping[str, Any], methods: Mapping[str, Any]) -> dict[str, Any]:
    """Cumulative total / trainable parameters of `cfg["tasks"]` (see the module docstring)."""
    method = MethodSettings.from_config(methods[cfg["method"]])
    # A task's own parts: the method without its frozen modality LoRAs (counted once below).
    own_parts = MethodSettings.from_config({**methods[cfg["method"]], "modality_loras": False})
    tasks = {}
    for name, task in cfg["tasks"].items():  # a fresh encoder each: methods may adapt or train it
        model = TaskModel(create_backbone(cfg["backbone"], weights="random"), task["streams"], own_parts,
                          head="segmentation", num_classes=task["classes"], decoder=cfg["decoder"])
        tasks[name] = {"streams": task["streams"], "classes": task["classes"], **model.parameter_counts()}
    backbone = create_backbone(cfg["backbone"], weights="random")
    encoder = sum(p.numel() for p in backbone.parameters())
    lora = lora_parameters(add_lora(backbone, LoraSettings.from_config(cfg["lora"]))) if method.modality_loras else 0
    modalities = sorted({s for task in cfg["tasks"].values() for s in task["streams"] if s != RGB})
    loras = {m: lora for m in modalities} if method.modality_loras else {}
    task_trainable = sum(t["trainable"] for t in tasks.values())
    trainable = task_trainable + sum(loras.values())
    frozen_encoder = 0 if method.train_encoder else encoder  # shared by every task when it stays frozen
    return {
        "backbone": cfg["backbone"], "method": cfg["method"], "lora": dict(cfg["lora"]),
        "encoder_parameters": encoder, "frozen_parameters": frozen_encoder, "modality_loras": loras, "tasks": tasks,
        "task_trainable": task_trainable, "trainable": trainable, "total": frozen_encoder + trainable,
        "reported": cfg.get("reported", {}),
    }
