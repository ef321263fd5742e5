"""Stage 2: a task model is the one frozen encoder run once per input stream, plus what a method
trains, a fusion of the streams and a task decoder.

Every Stage-2 method is a `MethodSettings` (config `methods.<name>`), so they are compared on
the same code path and the same data:

    method     encoder per stream                          trained                       fusion
    tp_mome    modality LoRA (frozen, from PSST) + prompts  prompts, TP-MoME, decoder   tp_mome
    freeze     plain frozen encoder                        fusion + decoder              concat
    full       the encoder itself, shared by the streams   everything                    concat
    lora       a task LoRA per stream, trained on labels   task LoRAs, fusion, decoder   concat
    vpt        deep prompts per stream                     prompts, fusion, decoder      concat
    iv_tuning  one visible pass, prompted by the aux input  IV-tuning modules, decoder    none
    cola       two streams in lockstep, cross-conditioned   CoLA adapters, fusion, dec.   concat

The RGB stream never gets a modality LoRA (the encoder is an RGB model). Adapters live in
one peft model over the shared encoder and are switched per stream (`use_adapter`), so the
frozen weights exist once however many streams run; frozen modality LoRAs run merged
(`MergedAdapters`: one copy of the adapted qkv weights per modality, no extra matmuls).
IV-tuning and CoLA (the seed methods, pipeline/models/iv_tuning.py and cola.py) take RGB + one
auxiliary stream, in that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from pipeline.data.types import RGB
from pipeline.models.backbone import Backbone
from pipeline.models.cola import CoLA
from pipeline.models.decoders import build_decoder
from pipeline.models.fusion import MultiScaleFusion
from pipeline.models.iv_tuning import IVTuning
from pipeline.models.lora import LoraSettings, MergedAdapters, add_lora, load_lora, use_adapter
from pipeline.models.prompts import TaskPrompts

IV_TUNING_STREAM = "prompted_rgb"
METHODS = ("tp_mome", "freeze", "full", "lora", "vpt", "iv_tuning", "cola")


@dataclass(frozen=True)
class MethodSettings:
    """One Stage-2 method (config `methods.<name>`); see the module docstring for the table."""

    name: str
    modality_loras: bool = False  # load each non-RGB stream's PSST modality LoRA (frozen)
    prompts: int = 0  # deep task prompts per block and stream (0 = none)
    task_lora: Mapping[str, Any] | None = None  # LoRA settings of a trainable LoRA per stream
    train_encoder: bool = False  # full fine-tuning of the shared encoder
    iv_tuning: Mapping[str, Any] | None = None  # IVTuning options (d1, d2, d3, dropout)
    cola: Mapping[str, Any] | None = None  # CoLA options (rank, alpha, targets)
    fusion: Mapping[str, Any] = field(default_factory=lambda: {"kind": "concat"})

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method {self.name!r} is not one of {', '.join(METHODS)}")
        if self.modality_loras and self.task_lora:
            raise ValueError(f"method {self.name!r}: a stream runs one adapter, not a modality and a task LoRA")
        encoders = [self.train_encoder, bool(self.task_lora or self.prompts or self.modality_loras),
                    bool(self.iv_tuning), bool(self.cola)]
        if sum(encoders) > 1:
            raise ValueError(f"method {self.name!r}: combine at most one of full fine-tuning, adapters/prompts, "
                             "IV-tuning and CoLA")

    @property
    def seed_method(self) -> bool:
        """IV-tuning and CoLA replace the per-stream encoder passes with their own dual-stream one."""
        return bool(self.iv_tuning or self.cola)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MethodSettings:
        return cls(**dict(config))

    @property
    def encoder_trains(self) -> bool:
        """Whether gradients must flow through the encoder (else it runs under no_grad)."""
        return self.train_encoder or self.prompts > 0 or bool(self.task_lora) or self.seed_method


class TaskModel(nn.Module):
    """`forward({stream: images})` -> logits (B, K, H, W) at the input size.

    The PeftModel holding the adapters is kept outside the module tree (as in PSST): it wraps
    the timm model that `backbone` already registers, and registering it too would list every
    encoder tensor twice.
    """

    def __init__(self, backbone: Backbone, streams: Sequence[str], method: MethodSettings, *, head: str,
                 num_classes: int, decoder: Mapping[str, Any], lora_dirs: Mapping[str, Path] | None = None):
        super().__init__()
        if len(set(streams)) != len(streams) or not streams:
            raise ValueError(f"streams must be distinct and non-empty, got {list(streams)}")
        self.backbone = backbone
        self.streams = list(streams)
        self.method = method
        backbone.requires_grad_(method.train_encoder)
        self.adapters: dict[str, str | None] = {stream: None for stream in self.streams}
        self.__dict__["peft"] = self._add_adapters(method, lora_dirs or {})
        frozen = [name for name in self.adapters.values() if name is not None] if method.modality_loras else []
        self.__dict__["merged"] = MergedAdapters(self.peft, frozen) if frozen else None
        self.prompts = TaskPrompts(backbone, self.streams, method.prompts) if method.prompts > 0 else None
        if method.seed_method and (len(self.streams) != 2 or self.streams[0] != RGB):
            raise ValueError(f"method {method.name!r} takes streams [rgb, <modality>], got {self.streams}")
        self.iv_tuning = IVTuning(backbone, **dict(method.iv_tuning)) if method.iv_tuning else None
        self.cola = CoLA(backbone, tuple(self.streams), **dict(method.cola)) if method.cola else None
        # IV-tuning yields one stream: the visible one, prompted by the auxiliary input
        self.fused_streams = [IV_TUNING_STREAM] if self.iv_tuning is not None else self.streams
        self.fusion = MultiScaleFusion(self.fused_streams, backbone.channels, **dict(method.fusion))
        self.decoder = build_decoder(head, backbone.channels, num_classes, **dict(decoder))

    def _add_adapters(self, method: MethodSettings, lora_dirs: Mapping[str, Path]) -> PeftModel | None:
        peft: PeftModel | None = None
        if method.modality_loras:
            for stream in self.streams:
                if stream == RGB:
                    continue
                if stream not in lora_dirs:
                    raise ValueError(f"method {method.name!r} needs the modality LoRA of stream {stream!r}")
                name = f"modality_{stream}"
                peft = load_lora(self.backbone, lora_dirs[stream], name, peft)
                self.adapters[stream] = name
        if method.task_lora:
            settings = LoraSettings.from_config(method.task_lora)
            for stream in self.streams:
                name = f"task_{stream}"
                if peft is None:
                    peft = add_lora(self.backbone, settings, name)
                else:
                    peft.add_adapter(name, settings.peft_config())
                _set_adapter_trainable(peft, name)
                self.adapters[stream] = name
        return peft

    def encode(self, stream: str, images: Tensor) -> list[Tensor]:
        """The four feature maps of one stream, with that stream's adapter and prompts."""
        if self.merged is not None:
            adapter = partial(self.merged.use, self.adapters[stream])
        elif self.peft is not None:
            adapter = partial(use_adapter, self.peft, self.adapters[stream])
        else:
            adapter = nullcontext
        with adapter(), self.backbone.recomputed_in(adapter):  # checkpointed blocks recompute with it
            if self.prompts is not None:
                return self.prompts.features(self.backbone, images, stream)
            return self.backbone(images)

    def features(self, inputs: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
        """The four feature maps of every stream the fusion reads."""
        if self.iv_tuning is not None:
            rgb, aux = (inputs[stream] for stream in self.streams)
            return {IV_TUNING_STREAM: self.iv_tuning(self.backbone, rgb, aux)}
        if self.cola is not None:
            return self.cola(self.backbone, {stream: inputs[stream] for stream in self.streams})
        return {stream: self.encode(stream, inputs[stream]) for stream in self.streams}

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor | tuple[Tensor, ...]:
        """Logits at the input size (a tuple (final, *side outputs) from a deeply supervised
        decoder in training)."""
        missing = [s for s in self.streams if s not in inputs]
        if missing:
            raise KeyError(f"task model needs inputs for streams {missing}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.method.encoder_trains):
            features = self.features(inputs)
        size = tuple(inputs[self.streams[0]].shape[-2:])
        return self.decoder(self.fusion(features), out_size=size)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters (frozen adapters and the encoder counted once)."""
        return {"trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "total": sum(p.numel() for p in self.parameters())}


def _set_adapter_trainable(peft: PeftModel, adapter_name: str) -> None:
    """peft marks only the *active* adapter trainable; a task LoRA per stream must all train."""
    for module in peft.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layers = getattr(module, layer_name)
                if adapter_name in layers:
                    layers[adapter_name].requires_grad_(True)
