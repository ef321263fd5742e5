"""The image encoder: a timm model that returns four feature maps, and where its weights came from.

Every method in xmodal (PSST, TP-MoME, the baselines) reads the same thing from its encoder:
four NCHW feature maps at strides 4, 8, 16 and 32 of the input, with `channels` and
`reductions` telling the decoder what to expect. This module builds that from timm:

* **Hiera** (`sam2_hiera_{tiny,small,base_plus,large}`, SAM 2's image-encoder trunk, the
  default) and **Swin** are hierarchical: the four stage outputs are the maps.
* **Plain ViTs** (ViT, DINOv2, EVA02) have one token grid at stride 14 or 16. We take four
  evenly spaced blocks (for 12 blocks: 3, 6, 9, 12, 1-based) and build a *parameter-free*
  simple pyramid: bilinear upsampling to finer strides, max-pooling to coarser ones (ViTDet
  pools for its coarsest level; for patch 14 the ratios are not integers, so the pooling is
  adaptive). No parameters, because a trainable neck belongs to the decoder: the backbone's
  parameters stay exactly timm's, so its fingerprint, checkpoint check and LoRA targets mean
  the same thing for every family. Block outputs are taken raw (no final norm), like the
  Hiera and Swin stage outputs.

Input sizes (checked on every forward, with a message instead of a shape error deep in timm):
Hiera takes any multiple of 32 (its window tiling needs the stride-4 grid to be a multiple
of 8); ViTs run with `dynamic_img_size=True` and take any size that is a multiple of both 32
and the patch size (patch 16: multiples of 32; patch 14: multiples of 224, so DINOv2's
default 518 is refused and its config uses 448); Swin builds attention masks for one size,
`img_size` at creation (a multiple of 32, or [H, W] for a non-square input such as MFNet's
480x640), and accepts only that size, unless built with timm's `dynamic_img_size=True`: then
it computes the shifted-window masks per input and takes any multiple of 32 (train on 512x512
crops, evaluate on 480x640 frames; window sizes still follow the `img_size` it was built for).

Token split (for SimMIM-style masking and prompt tokens). Hiera and Swin expose

    forward(x) == forward_tokens(embed(x)),   embed(x) == add_pos_embed(embed_patches(x))

with tokens as (B, H/4, W/4, C). A learned mask token replaces *patch* tokens before the
position embedding is added: `forward_tokens(add_pos_embed(mask(embed_patches(x))))`, so a
masked unit still knows where it is. Swin has no absolute position embedding (its relative
bias lives inside attention), so its `add_pos_embed` returns the tokens unchanged. ViTs do
not split: their class/register tokens and EVA's RoPE are tied to the grid inside timm's
`_pos_embed`; code that needs their insides uses the timm model, `Backbone.model`, directly.

Weights (`weights=`, required, so that random weights are never a silent default):

* `"pretrained"`: timm's own Hugging Face Hub download (needs network);
* `"checkpoint"` with `checkpoint=<path>`: a `.safetensors` file or a torch file (loaded with
  `weights_only=True`, so loading never runs code from the file), as a timm state dict
  (possibly under "model"/"state_dict") or Meta's official SAM 2 checkpoint (keys
  `image_encoder.trunk.*`, converted by timm's `hieradet_sam2.checkpoint_filter_fn`);
* `"random"`: timm's initialisation under `seed`, logged as a warning and recorded.

Every backbone records `weights`, `weights_source`, `weights_description` (what the weights
are, in words: a safetensors checkpoint may say so in its metadata, as the demo foundation
model does), `is_random_init`, `model_args` (the timm keyword arguments that shape the
architecture, e.g. a narrower `embed_dim`: `timm.create_model(name, **model_args)` rebuilds
it, and peft loads its LoRAs onto that) and `weights_fingerprint` (sha256 of its weights as
loaded) so that every later output can name exactly which encoder produced it. Parameters
keep timm's `requires_grad`; freezing is the LoRA module's job.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.models import eva, hieradet_sam2, swin_transformer, vision_transformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

logger = logging.getLogger(__name__)

REDUCTIONS = (4, 8, 16, 32)
ImgSize = int | tuple[int, int]  # a square side, or (H, W)
WEIGHTS_CHOICES = ("pretrained", "checkpoint", "random")

DESCRIPTION_KEY = "description"  # safetensors metadata: what the weights are, in words
SAM2_TRUNK_PREFIX = "image_encoder.trunk."
# The rest of a SAM 2 model (sam2/modeling/sam2_base.py, SAM 2.0 and 2.1): dropped on load.
# Anything else in a SAM 2 file is unexpected and refused.
SAM2_NON_TRUNK_PREFIXES = (
    "image_encoder.neck.",
    "sam_prompt_encoder.",
    "sam_mask_decoder.",
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "maskmem_tpos_enc",
    "no_mem_embed",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
)
# Top-level timm modules the backbone prunes (classifier and final norms): a timm checkpoint
# may carry them, the backbone never uses them.
PRUNED_MODULES = ("head", "norm", "fc_norm", "attn_pool")


class Backbone(nn.Module):
    """A timm encoder that returns four NCHW maps at strides 4, 8, 16, 32.

    `model` is the timm model itself (classifier and final norm pruned, so that no parameter
    goes unused, which DDP would reject). Provenance attributes are filled in by
    `create_backbone` once the weights are in place.
    """

    weights: str
    weights_source: str
    weights_description: str
    weights_fingerprint: str
    is_random_init: bool
    model_args: dict[str, Any]

    def __init__(self, name: str, model: nn.Module, img_size: ImgSize | None, size_multiple: int):
        super().__init__()
        self.name = name
        self.model = model
        self.in_chans: int = model.in_chans
        self.size_multiple = size_multiple
        self.img_size = img_size if img_size is not None else model.pretrained_cfg["input_size"][-1]
        _check_img_size(name, self.img_size, size_multiple)
        self.reductions = list(REDUCTIONS)
        self.channels: list[int] = []
        self.checkpointed_stages: tuple[int, ...] = ()
        self.recompute_context: Callable[[], AbstractContextManager] = nullcontext
        self.compile_backend: str | None = None
        self._compiled_call: Callable[..., Tensor] | None = None

    def set_activation_checkpointing(self, stages: bool | Sequence[int]) -> None:
        """Recompute the activations of the blocks of `stages` (0-3, finest first; True: all,
        False: none) in the backward pass instead of keeping them: memory for compute. Every
        block loop (plain, prompts, IV-tuning, CoLA, LoRA inside the blocks) reads it, and only
        when gradients are on: evaluation and scoring are unchanged."""
        chosen = tuple(range(len(REDUCTIONS))) if stages is True else () if stages is False else tuple(stages)
        valid = all(not isinstance(s, bool) and s in range(len(REDUCTIONS)) for s in chosen)
        if not valid or len(set(chosen)) < len(chosen):
            raise ValueError(f"activation_checkpointing={stages!r}: true, false or a list of distinct stages 0-3")
        self.checkpointed_stages = tuple(sorted(chosen))

    def set_compile(self, compile: bool | str) -> None:
        """Run every block through `torch.compile` (True: the default inductor backend; a string:
        that backend, e.g. "aot_eager" to debug; False: eager). Compiling block by block (what
        PyTorch calls regional compilation) serves every block loop alike (plain, prompts,
        IV-tuning, CoLA, inside activation checkpointing) and compiles each *kind* of block once:
        blocks of one shape share a graph, so Hiera-B+'s 24 blocks need 8 graphs, not 24 (more
        when streams switch adapters, hence the raised recompile limit). Shapes are static
        (`dynamic=False`): training crops have one size, and a second stream's recompile would
        otherwise retrace every block with symbolic shapes (13x slower to compile, measured)."""
        if compile is False or compile is None:
            self.compile_backend, self._compiled_call = None, None
            return
        backend = "inductor" if compile is True else str(compile)
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"compile={compile!r}: true, false or a torch.compile backend "
                             f"({', '.join(torch._dynamo.list_backends())})")
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compile_backend = backend
        self._compiled_call = torch.compile(_call, backend=backend, dynamic=False)

    def block_checkpointed(self, index: int) -> bool:
        """Whether block `index` (of the flat block list) runs under activation checkpointing."""
        raise NotImplementedError

    def run_block(self, index: int, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        """`fn(*args)`, the forward of block `index`: compiled when `set_compile` asked for it, and
        under activation checkpointing when its stage has it and gradients are on
        (non-reentrant, RNG state kept: drop path draws the same masks). The recomputation runs
        in backward, after every stream's forward, so it re-enters the `recompute_context` of its
        forward: the stream's adapter (its merged weights, or peft's switch to its LoRA)."""
        if self._compiled_call is not None:
            fn, args = self._compiled_call, (fn, *args)
        if not (self.block_checkpointed(index) and torch.is_grad_enabled()):
            return fn(*args)
        context = self.recompute_context
        return grad_checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), context()))

    @contextmanager
    def recomputed_in(self, context: Callable[[], AbstractContextManager]) -> Iterator[None]:
        """Blocks checkpointed inside this `with` recompute under `context()` (see `run_block`)."""
        previous, self.recompute_context = self.recompute_context, context
        try:
            yield
        finally:
            self.recompute_context = previous

    def check_input(self, x: Tensor) -> None:
        """Refuse a batch the encoder cannot map to exact strides 4-32, with a readable message."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.name}: expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"{self.name}: input size {h}x{w} is not supported; height and width must be "
                f"multiples of {self.size_multiple}"
            )

    @property
    def provenance(self) -> dict[str, Any]:
        """What every output of a run records about its encoder."""
        return {
            "backbone": self.name,
            "model_args": self.model_args,
            "weights": self.weights,
            "weights_source": self.weights_source,
            "weights_description": self.weights_description,
            "weights_fingerprint": self.weights_fingerprint,
            "is_random_init": self.is_random_init,
        }

    def _record_weights(self, weights: str, source: str, description: str, model_args: dict[str, Any]) -> None:
        self.weights = weights
        self.weights_source = source
        self.weights_description = description
        self.is_random_init = weights == "random"
        self.model_args = model_args
        self.weights_fingerprint = compute_fingerprint(self.model)


def _call(fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """`fn(*args)`: what `set_compile` compiles, so that one compiled function serves every block
    forward (a module, a method's block function with the block as an argument, a partial)."""
    return fn(*args)


class TokenBackbone(Backbone):
    """A hierarchical backbone whose forward splits at the patch tokens (module docstring)."""

    def embed_patches(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> patch tokens (B, H/4, W/4, D), before position information."""
        raise NotImplementedError

    def add_pos_embed(self, tokens: Tensor) -> Tensor:
        """Add the absolute position embedding to patch tokens (B, h, w, D)."""
        raise NotImplementedError

    def forward_tokens(self, tokens: Tensor) -> list[Tensor]:
        """Embedded tokens (B, H/4, W/4, D) -> the four NCHW stage maps."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        return self.add_pos_embed(self.embed_patches(x))

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_tokens(self.embed(x))


class HieraBackbone(TokenBackbone):
    """SAM 2's HieraDet trunk (timm `hieradet_sam2`)."""

    def __init__(self, name: str, model: hieradet_sam2.HieraDet, img_size: ImgSize | None):
        super().__init__(name, model, img_size, size_multiple=32)
        model.prune_intermediate_layers(len(REDUCTIONS), prune_head=True)
        self.channels = _stage_channels(name, model.feature_info)

    def embed_patches(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.model.patch_embed(x)

    def add_pos_embed(self, tokens: Tensor) -> Tensor:
        return self.model._pos_embed(tokens)

    def block_checkpointed(self, index: int) -> bool:
        stage = sum(index > end for end in self.model.stage_ends)
        return stage in self.checkpointed_stages

    def forward_tokens(self, tokens: Tensor) -> list[Tensor]:
        # Same loop as HieraDet.forward_intermediates, which cannot start from tokens.
        maps = []
        for i, block in enumerate(self.model.blocks):
            tokens = self.run_block(i, block, tokens)
            if i in self.model.stage_ends:
                maps.append(tokens.permute(0, 3, 1, 2))
        return maps


class SwinBackbone(TokenBackbone):
    """Swin Transformer (timm `swin_transformer`); stage outputs are NHWC in timm."""

    def __init__(self, name: str, model: swin_transformer.SwinTransformer, img_size: ImgSize | None):
        super().__init__(name, model, img_size, size_multiple=32)
        model.prune_intermediate_layers(len(REDUCTIONS), prune_norm=True, prune_head=True)
        self.channels = _stage_channels(name, model.feature_info)

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        built_for = tuple(self.model.patch_embed.img_size)
        h, w = x.shape[-2:]
        if not self.model.dynamic_img_size and (h, w) != built_for:
            raise ValueError(
                f"{self.name}: input size {x.shape[-2]}x{x.shape[-1]} differs from the size this "
                f"Swin was built for, {built_for[0]}x{built_for[1]}; Swin precomputes attention "
                f"masks per size, so create the backbone with img_size={w if h == w else [h, w]} "
                "(or dynamic_img_size=True for inputs of several sizes)"
            )

    def block_checkpointed(self, index: int) -> bool:
        depths = [len(stage.blocks) for stage in self.model.layers]
        stage = next(i for i in range(len(depths)) if index < sum(depths[: i + 1]))
        return stage in self.checkpointed_stages

    def embed_patches(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.model.patch_embed(x)

    def add_pos_embed(self, tokens: Tensor) -> Tensor:
        return tokens  # relative position bias lives inside Swin's attention

    def forward_tokens(self, tokens: Tensor) -> list[Tensor]:
        # timm's SwinTransformerStage.forward, block by block: its own checkpointing is reentrant
        # (checkpoint_seq), which gives no gradient to adapters inside a frozen encoder's blocks
        maps, index = [], 0
        for stage in self.model.layers:
            tokens = stage.downsample(tokens)
            for block in stage.blocks:
                tokens = self.run_block(index, block, tokens)
                index += 1
            maps.append(tokens.permute(0, 3, 1, 2).contiguous())
        return maps


class ViTBackbone(Backbone):
    """Plain ViT / DINOv2 / EVA02: four blocks' outputs (evenly spaced unless `out_blocks` names
    them, 0-based), parameter-free simple pyramid."""

    def __init__(self, name: str, model: nn.Module, img_size: ImgSize | None,
                 out_blocks: Sequence[int] | None = None):
        patch = model.patch_embed.patch_size[0]
        super().__init__(name, model, img_size, size_multiple=math.lcm(REDUCTIONS[-1], patch))
        self.patch_size = patch
        depth = len(model.blocks)
        if out_blocks is None:
            self.block_indices = [(i + 1) * depth // 4 - 1 for i in range(4)]  # 12 blocks: 2, 5, 8, 11
        else:
            self.block_indices = [int(i) for i in out_blocks]
            if len(self.block_indices) != len(REDUCTIONS) or self.block_indices != sorted(set(self.block_indices)) \
                    or not 0 <= self.block_indices[0] <= self.block_indices[-1] < depth:
                raise ValueError(f"{name}: out_blocks={list(out_blocks)} must be {len(REDUCTIONS)} increasing "
                                 f"0-based block indices below its depth {depth}")
        model.prune_intermediate_layers(self.block_indices, prune_norm=True, prune_head=True)
        self.channels = [model.embed_dim] * len(REDUCTIONS)

    def block_checkpointed(self, index: int) -> bool:
        stage = sum(index > taken for taken in self.block_indices)  # blocks up to the first taken: stage 0
        return stage in self.checkpointed_stages

    def position(self, patches: Tensor) -> tuple[Tensor, Tensor | None]:
        """Patch tokens (B, h, w, C) -> the sequence entering block 0 (prefix tokens first) and
        EVA's rotary embedding (None for a ViT): timm 1.0.31 `forward_intermediates`."""
        model = self.model
        if isinstance(model, eva.Eva):
            x, rope = model._pos_embed(patches)
        else:
            x, rope = model.patch_drop(model._pos_embed(patches)), None
        return model.norm_pre(x), rope

    def block_rope(self, rope: Tensor | None, index: int) -> Tensor | None:
        """Block `index`'s rotary embedding (EVA's mixed mode has one per block)."""
        return rope[index] if getattr(self.model, "rope_mixed", False) and rope is not None else rope

    def pyramid(self, sequences: Sequence[Tensor], size: Sequence[int]) -> list[Tensor]:
        """The four taken blocks' sequences of images of `size` -> the four NCHW maps at strides
        4-32: prefix tokens dropped, the patch grid resized by the parameter-free pyramid."""
        grid = self.model.patch_embed.dynamic_feat_size(tuple(size))
        prefix = self.model.num_prefix_tokens
        h, w = size
        return [
            self._resize(seq[:, prefix:].reshape(len(seq), *grid, -1).permute(0, 3, 1, 2).contiguous(),
                         stride, (h // stride, w // stride))
            for seq, stride in zip(sequences, REDUCTIONS, strict=True)
        ]

    def forward(self, x: Tensor) -> list[Tensor]:
        # timm's forward_intermediates block by block: checkpointing through `run_block`
        self.check_input(x)
        seq, rope = self.position(self.model.patch_embed(x))
        taken = []
        for i, block in enumerate(self.model.blocks):
            call = partial(block, rope=self.block_rope(rope, i)) if isinstance(self.model, eva.Eva) else block
            seq = self.run_block(i, call, seq)
            if i in self.block_indices:
                taken.append(seq)
        return self.pyramid(taken, x.shape[-2:])

    def _resize(self, grid: Tensor, stride: int, size: tuple[int, int]) -> Tensor:
        if stride < self.patch_size:
            return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        if stride > self.patch_size:
            return F.adaptive_max_pool2d(grid, size)
        return grid


# timm module -> (backbone class, timm's checkpoint filter, timm kwargs the family needs)
_Filter = Callable[..., dict[str, Tensor]]
_FAMILIES: dict[str, tuple[type[Backbone], _Filter, dict[str, Any]]] = {
    "hieradet_sam2": (HieraBackbone, hieradet_sam2.checkpoint_filter_fn, {}),
    "swin_transformer": (SwinBackbone, swin_transformer.checkpoint_filter_fn, {}),
    "vision_transformer": (
        ViTBackbone, vision_transformer.checkpoint_filter_fn, {"dynamic_img_size": True}
    ),
    "eva": (ViTBackbone, eva.checkpoint_filter_fn, {"dynamic_img_size": True}),
}


def create_backbone(
    name: str = "sam2_hiera_base_plus",
    *,
    weights: str,
    checkpoint: str | Path | None = None,
    img_size: ImgSize | None = None,
    out_blocks: Sequence[int] | None = None,
    seed: int = 0,
    **timm_kwargs: Any,
) -> Backbone:
    """Build a four-scale backbone and record where its weights came from.

    `weights` is required ("pretrained" | "checkpoint" | "random"); `checkpoint` is the file
    for "checkpoint" and must be None otherwise. `img_size` is the size a Swin is built for
    and a ViT's position-embedding grid, a side or [H, W]; for Hiera it is only checked and
    recorded (None: the timm default). `out_blocks` (ViT/EVA only) names the four blocks, 0-based,
    whose outputs form the pyramid (None: evenly spaced). `seed` fixes the random initialisation (without touching the global RNG).
    `timm_kwargs` go to `timm.create_model` (e.g. `embed_dim` for a narrower Hiera, `drop_path_rate`)
    and are recorded as `model_args`.
    """
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS_CHOICES)}")
    if weights == "checkpoint" and checkpoint is None:
        raise ValueError("weights='checkpoint' needs checkpoint=<path to .safetensors or .pt>")
    if weights != "checkpoint" and checkpoint is not None:
        raise ValueError(
            f"checkpoint={str(checkpoint)!r} is given but weights={weights!r}; "
            "set weights='checkpoint'"
        )
    if "pretrained" in timm_kwargs:
        raise ValueError("pass weights='pretrained' (or 'checkpoint'/'random'), not pretrained=")
    family = next(
        (f for module, f in _FAMILIES.items() if timm.models.is_model_in_modules(name, [module])),
        None,
    )
    if family is None:
        known = "unknown to timm" if not timm.is_model(name) else "of an unsupported family"
        raise ValueError(
            f"backbone {name!r} is {known}; supported: SAM 2 Hiera, ViT/DINOv2, EVA02, Swin"
        )
    cls, filter_fn, family_kwargs = family
    if out_blocks is not None and cls is not ViTBackbone:
        raise ValueError(f"out_blocks={list(out_blocks)} is for ViT/EVA backbones; {name} has fixed stage outputs")
    if img_size is not None:  # the part of the check that needs no model: fail before the build
        img_size = img_size if isinstance(img_size, int) else tuple(img_size)  # YAML gives lists
        _check_img_size(name, img_size, REDUCTIONS[-1])
    kwargs = {**family_kwargs, **timm_kwargs}
    if img_size is not None and cls is not HieraBackbone:  # HieraDet has no img_size argument
        kwargs["img_size"] = img_size

    if weights == "checkpoint":  # read and convert first: a bad file fails before the build
        state_dict, layout = _read_checkpoint(Path(checkpoint), cls, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create_timm_model(name, pretrained=weights == "pretrained", **kwargs)
    backbone = cls(name, model, img_size, **({"out_blocks": out_blocks} if out_blocks is not None else {}))

    if weights == "pretrained":
        cfg = model.pretrained_cfg
        source = f"timm:{cfg.get('hf_hub_id') or cfg.get('url') or name}"
        description = f"pretrained ({source})"
    elif weights == "checkpoint":
        if layout == "timm":
            state_dict = filter_fn(state_dict, model)
        _load_strict(backbone, state_dict, f"checkpoint {checkpoint} ({layout} layout)")
        source = f"checkpoint:{checkpoint} ({layout})"
        description = checkpoint_metadata(checkpoint).get(DESCRIPTION_KEY) or f"checkpoint {Path(checkpoint).name}"
    else:
        source = f"random-init(seed={seed})"
        description = "random initialisation"
        logger.warning(
            "backbone %s uses RANDOM weights (seed=%d): its features carry no pretraining; "
            "every output records weights_source=%r. Use weights='pretrained' or 'checkpoint' "
            "for real runs.",
            name,
            seed,
            source,
        )
    backbone._record_weights(weights, source, description, dict(timm_kwargs))
    return backbone


def _create_timm_model(name: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:  # hub clients raise many types (OSError, httpx/requests errors, ...)
        raise RuntimeError(
            f"could not load timm's pretrained weights for {name!r} "
            f"({type(err).__name__}: {err}). weights='pretrained' downloads from the Hugging Face "
            "Hub and needs network access; on a machine without it, download the file elsewhere "
            "and use weights='checkpoint' with checkpoint=<path to a .safetensors file or Meta's "
            "SAM 2 .pt>."
        ) from err


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a `.safetensors` header ({} for torch files, which have none).

    A checkpoint that xmodal wrote says what it is under `description` (e.g. "demo foundation
    model (synthetic RGB)"), and every output of a run that loads it repeats that.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a flat {name: tensor} dict from `.safetensors` or a torch file.

    Torch files are opened with `weights_only=True`: a checkpoint is data, and a file that
    needs arbitrary unpickling is refused rather than executed. A dict nested under "model"
    (Meta's SAM 2) or "state_dict" (Lightning, timm's train script) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0]
        raise ValueError(
            f"{path}: refused to load: the file contains pickled objects other than tensors, "
            "and checkpoints are read with torch.load(weights_only=True) so that loading never "
            f"runs code from the file. Re-save it as a plain state dict or .safetensors. ({reason})"
        ) from err
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict of tensors; non-tensor entries: {bad[:5]}")
    return obj


def convert_sam2_checkpoint(state_dict: dict[str, Any]) -> dict[str, Tensor]:
    """Meta's SAM 2 checkpoint -> a timm `HieraDet` state dict (the image-encoder trunk only).

    The conversion itself is timm's (`image_encoder.trunk.` prefix dropped, `mlp.layers.0/1`
    renamed to `mlp.fc1/fc2`); the known rest of SAM 2 (neck, prompt encoder, mask decoder,
    memory modules) is dropped, and anything else is refused so a foreign file cannot pass.
    """
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith(SAM2_TRUNK_PREFIX) for k in state_dict):
        raise ValueError(f"not a SAM 2 checkpoint: no key starts with {SAM2_TRUNK_PREFIX!r}")
    unknown = [
        k
        for k in state_dict
        if not k.startswith(SAM2_TRUNK_PREFIX) and not k.startswith(SAM2_NON_TRUNK_PREFIXES)
    ]
    if unknown:
        raise ValueError(
            f"SAM 2 checkpoint has {len(unknown)} keys that are neither the image-encoder trunk "
            f"nor a known SAM 2 module: {unknown[:5]}"
        )
    return hieradet_sam2.checkpoint_filter_fn(state_dict, None, prefix=SAM2_TRUNK_PREFIX)


def _read_checkpoint(
    path: Path, cls: type[Backbone], name: str
) -> tuple[dict[str, Tensor], str]:
    """Read `path` and detect its layout: "sam2" (converted here) or "timm".

    Any key under `image_encoder.trunk.` means Meta's SAM 2 layout, converted by
    `convert_sam2_checkpoint`; otherwise the keys are timm's, and after the build the family's
    own timm filter resamples position embeddings / relative-bias tables to the model's size,
    as timm does for its pretrained weights.
    """
    state_dict = load_state_dict_file(path)
    if not any(k.startswith(SAM2_TRUNK_PREFIX) for k in state_dict):
        return state_dict, "timm"
    if cls is not HieraBackbone:
        raise ValueError(
            f"{path} is a SAM 2 checkpoint; it only fits sam2_hiera_* backbones, not {name}"
        )
    return convert_sam2_checkpoint(state_dict), "sam2"


def _load_strict(backbone: Backbone, state_dict: dict[str, Tensor], what: str) -> None:
    """Load every backbone tensor from `state_dict`, or fail naming what does not fit.

    Only the classifier and final norms that the backbone prunes may be left over; anything
    else missing, extra or of the wrong shape means a checkpoint of another model.
    """
    expected = backbone.model.state_dict()
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if k in expected or k.split(".", 1)[0] not in PRUNED_MODULES
    }
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state_dict.keys())
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        found = {
            "missing keys": missing,
            "unexpected keys": unexpected,
            "shape mismatches": mismatched,
        }
        problems = [
            f"{len(keys)} {kind} (first: {', '.join(keys[:4])})"
            for kind, keys in found.items()
            if keys
        ]
        raise ValueError(
            f"{what} does not fit backbone {backbone.name}: {'; '.join(problems)}. "
            "Is it a checkpoint of another model?"
        )
    backbone.model.load_state_dict(state_dict, strict=True)


def compute_fingerprint(module: nn.Module) -> str:
    """sha256 (hex) over the sorted state-dict names, shapes and float32 bytes.

    It hashes the values as loaded into the model, so the file's layout (SAM 2 `.pt`, timm
    `.safetensors`) and storage dtype do not matter, only the weights. Non-persistent buffers
    (Swin's attention masks, RoPE tables) are derived, not weights, and are left out, as in
    `state_dict`.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _check_img_size(name: str, img_size: ImgSize, multiple: int) -> None:
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(sizes) != 2 or min(sizes) <= 0 or any(size % multiple for size in sizes):
        example = [multiple * max(1, size // multiple) for size in sizes]
        raise ValueError(
            f"{name}: img_size {img_size} is not supported; it must be a positive multiple of "
            f"{multiple} (or [H, W] of such), e.g. {example[0] if isinstance(img_size, int) else example}"
        )


def _stage_channels(name: str, feature_info: list[dict[str, Any]]) -> list[int]:
    """Channels of the four stages, after checking that they sit at strides 4-32."""
    reductions = [info["reduction"] for info in feature_info]
    if reductions != list(REDUCTIONS):
        raise ValueError(f"{name}: stage strides {reductions}, expected {list(REDUCTIONS)}")
    return [info["num_chs"] for info in feature_info]
