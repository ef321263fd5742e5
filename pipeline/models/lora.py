"""Modality LoRAs: trained inside a frozen encoder, exported once, loaded as named adapters.

Stage 1 (PSST) trains a LoRA on the encoder's attention `qkv` projections for one modality
and exports it as a small, frozen, reusable *modality LoRA artifact*:

    <artifact>/adapter_model.safetensors   peft's weights (keys
                                            `base_model.model.blocks.<i>.attn.qkv.lora_{A,B}.weight`,
                                            no adapter name, so any name can load them)
    <artifact>/adapter_config.json          peft's LoraConfig
    <artifact>/xmodal.json                  provenance: encoder name + weights fingerprint,
                                            LoRA settings, modality, PSST config, losses

peft is applied to the timm model itself (`Backbone.model`), not to the `Backbone` wrapper, so
an artifact is plain peft: `PeftModel.from_pretrained(timm.create_model(name), artifact)`
loads it without xmodal. The wrapper keeps working because peft swaps the `qkv` Linear layers
in place. A LoRA is a delta on exact weights, so `load_lora` refuses an artifact whose encoder
name or weights fingerprint differs from the backbone it is loaded into.

Later stages load several artifacts into one frozen encoder as named adapters (one per
modality) and pick one per stream with `use_adapter` (None for RGB: no adapter). peft's
switches also write `requires_grad`, which `use_adapter` undoes (see there). A frozen adapter
can also run merged (`MergedAdapters`): W + Delta W computed once, one matmul per layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from pipeline import __version__
from pipeline.artifacts import atomic_dir, write_json
from pipeline.models.backbone import Backbone

FORMAT = "xmodal-modality-lora"
FORMAT_VERSION = 1
PROVENANCE = "xmodal.json"
PEFT_MODEL_CARD = "README.md"


class IncompatibleLoraError(ValueError):
    """A LoRA artifact was trained in another encoder (name or weights) than the one given."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA size and placement (config `psst.lora`); `targets` are module-name suffixes."""

    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv",)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LoraSettings:
        """From the config mapping, where `targets` is a list."""
        return cls(**{**config, "targets": tuple(config["targets"])})

    def peft_config(self) -> LoraConfig:
        """peft's config; B starts at zero (peft's default), so a new LoRA changes nothing."""
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            bias="none",
        )


def add_lora(backbone: Backbone, settings: LoraSettings, adapter_name: str = "default") -> PeftModel:
    """Insert a trainable LoRA into `backbone.model` (in place) and return the PeftModel.

    peft freezes every other parameter of the timm model on this first injection, so the
    LoRA is all that trains; `backbone` itself keeps working and now runs with the LoRA.
    """
    return get_peft_model(backbone.model, settings.peft_config(), adapter_name)


def lora_parameters(peft_model: PeftModel, adapter_name: str = "default") -> int:
    """Number of parameters of one adapter, trainable or not (what xmodal.json records)."""
    return sum(
        p.numel()
        for module in peft_model.modules()
        if isinstance(module, BaseTunerLayer)
        for layer_name in module.adapter_layer_names
        if adapter_name in getattr(module, layer_name)
        for p in getattr(module, layer_name)[adapter_name].parameters()
    )


def lora_provenance(
    backbone: Backbone,
    settings: LoraSettings,
    peft_model: PeftModel,
    adapter_name: str = "default",
    **extra: Any,
) -> dict[str, Any]:
    """The base of xmodal.json; `extra` adds the caller's sections (modality, psst, shards, losses).

    `settings` must be the ones the adapter was built with, or the record would lie.
    """
    config = peft_model.peft_config[adapter_name]
    built = (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules))
    if built != (settings.rank, settings.alpha, settings.dropout, set(settings.targets)):
        raise ValueError(f"adapter {adapter_name!r} was built with other LoRA settings than {settings}")
    provenance = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xmodal_version": __version__,
        "backbone": backbone.provenance,
        "lora": {
            "rank": settings.rank,
            "alpha": settings.alpha,
            "dropout": settings.dropout,
            "targets": list(settings.targets),
            "parameters": lora_parameters(peft_model, adapter_name),
        },
    }
    clash = provenance.keys() & extra.keys()
    if clash:
        raise ValueError(f"lora_provenance: extra sections {sorted(clash)} would overwrite the base record")
    return {**provenance, **extra}


def export_lora(
    peft_model: PeftModel, out_dir: Path | str, provenance: Mapping[str, Any], adapter_name: str = "default"
) -> Path:
    """Write one adapter as a modality LoRA artifact; `out_dir` is replaced only once complete.

    peft always writes a generic Hub model card (README.md) that says nothing about this
    artifact, so it is dropped; xmodal.json is the description. peft saves an adapter not named
    "default" in a subfolder of its name; its files are moved up so that every artifact has
    the same layout.
    """
    if provenance.get("format") != FORMAT:
        raise ValueError("export_lora: build the provenance with lora_provenance()")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
        (tmp / PEFT_MODEL_CARD).unlink(missing_ok=True)
        if adapter_name != "default":
            for path in (tmp / adapter_name).iterdir():
                path.rename(tmp / path.name)
            (tmp / adapter_name).rmdir()
        write_json(tmp / PROVENANCE, provenance)
    return out_dir


def read_provenance(artifact_dir: Path | str) -> dict[str, Any]:
    """xmodal.json of an artifact, checked enough that `check_compatible` can rely on it."""
    path = Path(artifact_dir) / PROVENANCE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {artifact_dir} is not an exported modality LoRA")
    try:
        provenance = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(provenance, dict) or provenance.get("format") != FORMAT:
        raise ValueError(f"{path} is not an xmodal modality LoRA record (expected format {FORMAT!r})")
    if provenance.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {provenance.get('format_version')!r}; "
            f"this xmodal reads version {FORMAT_VERSION}"
        )
    encoder = provenance.get("backbone")
    if not isinstance(encoder, dict) or not {"backbone", "weights_fingerprint"} <= encoder.keys():
        raise ValueError(f"{path}: 'backbone' must record the encoder's name and weights_fingerprint")
    return provenance


def check_compatible(provenance: Mapping[str, Any], backbone: Backbone, artifact_dir: Path | str) -> None:
    """Refuse a LoRA trained in another encoder: its deltas only mean something on those weights."""
    trained = provenance["backbone"]
    if (trained["backbone"], trained["weights_fingerprint"]) == (backbone.name, backbone.weights_fingerprint):
        return
    raise IncompatibleLoraError(
        f"modality LoRA {artifact_dir} was trained in backbone {trained['backbone']} with weights "
        f"fingerprint {trained['weights_fingerprint']} ({trained.get('weights_source', 'unknown source')}), "
        f"but this backbone is {backbone.name} with weights fingerprint {backbone.weights_fingerprint} "
        f"({backbone.weights_source}). Load it into the encoder it was trained in, or retrain it."
    )


def load_lora(
    backbone: Backbone, artifact_dir: Path | str, adapter_name: str, peft_model: PeftModel | None = None
) -> PeftModel:
    """Load an artifact into `backbone.model` as a frozen adapter named `adapter_name`.

    The first adapter creates the PeftModel (`PeftModel.from_pretrained`); pass it back as
    `peft_model` to add more (`load_adapter`), all sharing the one frozen encoder. The
    active adapter is the first one loaded; pick one per forward with `use_adapter`.
    """
    artifact_dir = Path(artifact_dir)
    check_compatible(read_provenance(artifact_dir), backbone, artifact_dir)
    device = str(next(backbone.model.parameters()).device)
    was_training = backbone.model.training  # peft switches to eval mode when loading frozen
    if peft_model is None:
        if any(isinstance(m, BaseTunerLayer) for m in backbone.model.modules()):
            raise ValueError(f"{backbone.name} already has adapters: pass their PeftModel as peft_model")
        peft_model = PeftModel.from_pretrained(
            backbone.model, artifact_dir, adapter_name=adapter_name, is_trainable=False, torch_device=device
        )
    else:
        if peft_model.get_base_model() is not backbone.model:
            raise ValueError("peft_model does not wrap this backbone's model")
        if adapter_name in peft_model.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded")
        peft_model.load_adapter(artifact_dir, adapter_name, is_trainable=False, torch_device=device)
    backbone.model.train(was_training)
    return peft_model


@torch.no_grad()
def lora_update_norms(peft_model: PeftModel, backbone: Backbone, adapter_name: str = "default") -> dict[str, float]:
    """How far an adapter moves the encoder: ||Delta W||_F / ||W||_F over the adapted layers of
    each encoder stage (Hiera's `stage_ends`, Swin's `layers.<s>`), and over all of them.

    Delta W = (alpha / r) B A is peft's `get_delta_weight`; 0 means the identity LoRA (B = 0).
    """
    stage_ends = list(getattr(backbone.model, "stage_ends", []))
    delta_sq: dict[str, float] = {}
    weight_sq: dict[str, float] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        stage = _stage_of(name, stage_ends)
        delta = module.get_delta_weight(adapter_name).float()
        weight = module.get_base_layer().weight.float()
        for group in (stage, "all"):
            delta_sq[group] = delta_sq.get(group, 0.0) + float(delta.square().sum())
            weight_sq[group] = weight_sq.get(group, 0.0) + float(weight.square().sum())
    return {group: round(math.sqrt(delta_sq[group] / weight_sq[group]), 6) for group in sorted(delta_sq)}


def _stage_of(module_name: str, stage_ends: list[int]) -> str:
    """`stage<k>` (1-based) of an adapted layer from its module name, or `all` if unknown."""
    parts = module_name.split(".")
    if "blocks" in parts and stage_ends and "layers" not in parts:
        block = int(parts[parts.index("blocks") + 1])
        return f"stage{next(i for i, end in enumerate(stage_ends) if block <= end) + 1}"
    if "layers" in parts:
        return f"stage{int(parts[parts.index('layers') + 1]) + 1}"
    return "all"


@contextmanager
def use_adapter(peft_model: PeftModel, adapter_name: str | None) -> Iterator[PeftModel]:
    """Run the encoder with one named adapter active, or with none (the RGB stream).

    peft's switches write `requires_grad`: `set_adapter` makes the adapter it activates
    trainable and every other one frozen, and leaving `disable_adapter()` makes the active
    adapter trainable again. Frozen modality LoRAs must stay frozen (and a LoRA in training
    must keep training), so every flag is kept as it was, inside the context and after it.
    """
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    previous = peft_model.active_adapter
    try:
        if adapter_name is None:
            switch = peft_model.disable_adapter()
        else:
            peft_model.set_adapter(adapter_name)
            switch = nullcontext()
        with switch:
            _set_flags(flags)
            yield peft_model
    finally:
        peft_model.set_adapter(previous)
        _set_flags(flags)


def _set_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for param, requires_grad in flags:
        param.requires_grad_(requires_grad)


class MergedAdapters:
    """Frozen adapters run as merged weights: W + Delta W per adapted layer, computed once.

    peft runs an unmerged adapter as `W x + B (A x) * alpha / r`: two more matmuls per layer,
    forward and backward, for rank 32 on Hiera's qkv 5-20% more work in its narrow early blocks
    (and more kernel launches). A modality LoRA in Stage 2 never changes, so each stream can run
    `(W + Delta W) x` instead: the same function (up to float rounding), no extra work. peft's own
    `merge_adapter` would add Delta W into W in place, which one shared encoder cannot do for
    several streams in one step (the RGB stream needs W, and autograd keeps W for backward);
    here each adapter keeps its own merged copy and `use` swaps it in for the duration of one
    stream's pass. The cost is one copy of the adapted weights per adapter (qkv: 63 MB fp32 for
    Hiera-B+, 203 MB for Hiera-L), made on the weights' device at the first use and again only
    if they move (`.to()`) or change dtype.

    From construction on, this object switches the adapters, not peft: peft's adapter layers are
    turned off for good (so every layer runs its base Linear), which is also why every adapter
    of the model must be frozen. peft's switches (`use_adapter`) walk every module of the model,
    ~10 ms a call on a CPU, paid again per checkpointed block in backward; `use` is a loop of
    attribute assignments.
    """

    def __init__(self, peft_model: PeftModel, adapter_names: Sequence[str]):
        self.layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        for name in adapter_names:
            if not any(name in m.lora_A for m in self.layers):
                raise ValueError(f"no adapter named {name!r} is loaded")
        trainable = sorted({n.split(".lora_")[1].split(".")[1] for n, p in peft_model.named_parameters()
                            if ".lora_" in n and p.requires_grad})
        if trainable or any(m.get_base_layer().weight.requires_grad for m in self.layers):
            raise ValueError(f"adapters {trainable} (or the weights under them) train: only a model whose adapters "
                             "and adapted weights are all frozen can run merged, a merged copy would not see updates")
        for layer in self.layers:
            layer.enable_adapters(False)  # every layer runs its base Linear, whose weight `use` chooses
        self.names = tuple(adapter_names)
        self._base = [m.get_base_layer().weight for m in self.layers]
        self._merged: dict[str, list[nn.Parameter]] = {}

    @torch.no_grad()
    def weights(self, adapter_name: str | None) -> list[nn.Parameter]:
        """The weight of every adapted layer with `adapter_name` merged in (None: the base weights;
        a layer the adapter does not adapt keeps its base weight)."""
        if adapter_name is None:
            return self._base
        base = self._base[0]
        merged = self._merged.get(adapter_name)
        if merged is None or (merged[0].device, merged[0].dtype) != (base.device, base.dtype):
            merged = [nn.Parameter(weight + m.get_delta_weight(adapter_name), requires_grad=False)
                      if adapter_name in m.lora_A else weight
                      for m, weight in zip(self.layers, self._base, strict=True)]
            self._merged[adapter_name] = merged
        return merged

    @contextmanager
    def use(self, adapter_name: str | None) -> Iterator[None]:
        """Run the encoder with `adapter_name` merged in (None: the plain encoder, the RGB stream).

        Re-entrant: activation checkpointing re-enters a stream's context in backward, and
        leaving restores whatever weights were in place on entry."""
        if adapter_name is not None and adapter_name not in self.names:
            raise KeyError(f"adapter {adapter_name!r} is not one of the merged adapters {list(self.names)}")
        bases = [m.get_base_layer() for m in self.layers]
        previous = [layer.weight for layer in bases]
        try:
            for layer, weight in zip(bases, self.weights(adapter_name), strict=True):
                layer.weight = weight
            yield
        finally:
            for layer, weight in zip(bases, previous, strict=True):
                layer.weight = weight
