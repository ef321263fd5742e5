"""Parameter counts at the seed paper's scale, without training (the report's efficiency section).

The demo's encoder is small, so its parameter totals say little about the method's cost at the
scale it is meant for. `paper_scale_parameters` builds the *same* modules at that scale (SAM 2
Hiera-B+, the paper's five downstream tasks with their streams and class counts, the method
of `paper_scale.method` as configured under `methods`) and counts, cumulatively over the
tasks: the frozen encoder once, each modality LoRA once (shared by every task that reads the
modality), and every task's own trainable parts. Nothing is trained or loaded: the encoder is
randomly initialised, which does not change a count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from pipeline.data.types import RGB
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.models.backbone import Backbone, create_backbone
from pipeline.models.lora import LoraSettings


def lora_parameter_count(backbone: Backbone, settings: LoraSettings) -> int:
    """Parameters of one LoRA on `backbone`: r x (in + out) per targeted Linear (A is r x in,
    B is out x r), matched by module-name suffix as peft's `target_modules` does."""
    return sum(settings.rank * (module.in_features + module.out_features)
               for name, module in backbone.model.named_modules()
               if isinstance(module, nn.Linear) and name.split(".")[-1] in settings.targets)


def paper_scale_parameters(cfg: Mapping[str, Any], methods: Mapping[str, Any]) -> dict[str, Any]:
    """Cumulative total / trainable parameters of `cfg["tasks"]` (see the module docstring)."""
    backbone = create_backbone(cfg["backbone"], weights="random")
    encoder = sum(p.numel() for p in backbone.parameters())
    method = MethodSettings.from_config(methods[cfg["method"]])
    lora = lora_parameter_count(backbone, LoraSettings.from_config(cfg["lora"])) if method.modality_loras else 0
    # The task's own parts: the method without its frozen modality LoRAs (counted once below).
    own_parts = MethodSettings.from_config({**methods[cfg["method"]], "modality_loras": False})
    tasks = {}
    for name, task in cfg["tasks"].items():
        model = TaskModel(backbone, task["streams"], own_parts, head="segmentation", num_classes=task["classes"],
                          decoder=cfg["decoder"])
        tasks[name] = {"streams": task["streams"], "classes": task["classes"],
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    modalities = sorted({s for task in cfg["tasks"].values() for s in task["streams"] if s != RGB})
    loras = {m: lora for m in modalities} if method.modality_loras else {}
    task_trainable = sum(t["trainable"] for t in tasks.values())
    trainable = task_trainable + sum(loras.values())
    return {
        "backbone": cfg["backbone"], "method": cfg["method"], "lora": dict(cfg["lora"]),
        "encoder_parameters": encoder, "modality_loras": loras, "tasks": tasks,
        "task_trainable": task_trainable, "trainable": trainable, "total": encoder + trainable,
        "reported": cfg.get("reported", {}),
    }
