"""Deep task prompts (VPT-deep) for SAM 2's Hiera: learned tokens that join every attention.

Stage 2 trains, per stream (RGB, thermal, ...) and per encoder block, `num_prompts` tokens that
join that block's self-attention while the encoder stays frozen. As in VPT-deep, a block's
prompt outputs are discarded after the block (the next block has its own prompts), so only
their keys and values matter: the queries are the image tokens, the keys/values are
[prompt tokens; image tokens]. This equals running attention over all N + P tokens and keeping
the N image outputs, without computing prompt outputs that nobody reads.

Choices, and why:

* **Every window, same prompts.** Hiera attends inside local windows (and over the whole image
  in its global blocks). The block's prompts join every window of every image, so the prompted
  encoder treats all windows alike, just as Hiera's shared weights do.
* **Learned after `norm1`.** A prompt is a vector in the space that enters `attn.qkv`, not a
  token that goes through the block's LayerNorm: a LayerNorm of a free parameter would only
  restrict where it can go, and makes the prompt depend on frozen normalisation statistics.
* **Through `attn.qkv`.** Keys and values are `attn.qkv(prompts)`, so a modality LoRA on `qkv`
  acts on the prompts of its stream exactly as on its image tokens.
* **Q-pooling blocks** (stage transitions): the queries are max-pooled as in timm; prompts have
  no position, so they only add keys/values, which timm never pools.

The frozen encoder is passed in, not held: one encoder (with its modality LoRAs) serves every
stream, and a checkpoint of this module holds only the prompts. Nothing in the encoder is
wrapped or replaced, so module paths (and the LoRA's keys) stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.hieradet_sam2 import MultiScaleAttention, MultiScaleBlock
from torch import Tensor, nn

from pipeline.models.backbone import Backbone, HieraBackbone
from pipeline.models.hiera_block import hiera_block_forward


def prompted_attention(attn: MultiScaleAttention, x: Tensor, prompts: Tensor | None) -> Tensor:
    """timm's `MultiScaleAttention.forward` on windows (B, h, w, C), with the prompts (P, C)
    adding P keys/values to every window; None: no prompts."""
    batch, h, w, _ = x.shape
    q, k, v = attn.qkv(x).reshape(batch, h * w, 3, attn.num_heads, -1).unbind(2)
    if attn.q_pool is not None:
        q = attn.q_pool(q.reshape(batch, h, w, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        h, w = q.shape[1:3]
        q = q.reshape(batch, h * w, attn.num_heads, -1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, tokens, d)
    if prompts is not None:
        # The prompts' queries are computed and dropped: slicing the weight would bypass a LoRA.
        head_dim = attn.dim_out // attn.num_heads
        prompt_kv = attn.qkv(prompts.to(x.dtype)).reshape(len(prompts), 3, attn.num_heads, head_dim)
        prompt_k, prompt_v = prompt_kv[:, 1:].permute(1, 2, 0, 3)  # each (heads, P, d)
        k = torch.cat([prompt_k.expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([prompt_v.expand(batch, -1, -1, -1), v], dim=2)
    x = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(x.transpose(1, 2).reshape(batch, h, w, -1))


def prompted_block_forward(block: MultiScaleBlock, x: Tensor, prompts: Tensor | None) -> Tensor:
    """`block(x)` for tokens (B, H, W, C) with `prompts` (P, C) joining every window's attention
    (the block itself runs as timm's, see `hiera_block_forward`)."""
    return hiera_block_forward(block, x, attend=lambda windows: prompted_attention(block.attn, windows, prompts))


def _hiera_blocks(backbone: Backbone) -> nn.Sequential:
    if not isinstance(backbone, HieraBackbone):
        raise TypeError(
            f"{backbone.name}: task prompts are implemented for SAM 2 Hiera backbones "
            f"(sam2_hiera_*) only, not for {type(backbone).__name__}"
        )
    return backbone.model.blocks


class TaskPrompts(nn.Module):
    """Per stream, per Hiera block: `num_prompts` learned tokens of the block's input width.

    Parameters are `prompts.<stream>.<block index>`, each (num_prompts, block.dim), drawn from
    a truncated normal with std `init_std` (post-norm tokens are O(1), so prompts start small).
    `num_prompts=0` is allowed and gives the plain encoder (a baseline with the same code path).
    """

    def __init__(
        self, backbone: Backbone, streams: Sequence[str], num_prompts: int, init_std: float = 0.02
    ):
        super().__init__()
        blocks = _hiera_blocks(backbone)
        if num_prompts < 0:
            raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
        if not streams or len(set(streams)) != len(streams):
            raise ValueError(f"streams must be distinct and not empty, got {list(streams)}")
        self.streams = tuple(streams)
        self.num_prompts = num_prompts
        self.prompts = nn.ModuleDict({
            stream: nn.ParameterList(
                nn.Parameter(nn.init.trunc_normal_(torch.empty(num_prompts, block.dim), std=init_std))
                for block in blocks
            )
            for stream in self.streams
        })

    @property
    def num_parameters(self) -> int:
        """Trainable size: streams x num_prompts x (sum of the blocks' input widths)."""
        return sum(p.numel() for p in self.parameters())

    def forward_tokens(self, backbone: Backbone, tokens: Tensor, stream: str) -> list[Tensor]:
        """`backbone.forward_tokens(tokens)` with `stream`'s prompts in every block."""
        blocks = _hiera_blocks(backbone)
        if stream not in self.prompts:
            raise KeyError(f"unknown stream {stream!r}; these prompts have {list(self.streams)}")
        prompts = self.prompts[stream]
        if [p.shape[-1] for p in prompts] != [block.dim for block in blocks]:
            raise ValueError(f"{backbone.name}: its blocks do not match the ones the prompts were built for")
        maps = []
        for i, (block, block_prompts) in enumerate(zip(blocks, prompts, strict=True)):
            tokens = backbone.run_block(i, prompted_block_forward, block, tokens, block_prompts)
            if i in backbone.model.stage_ends:
                maps.append(tokens.permute(0, 3, 1, 2))
        return maps

    def features(self, backbone: Backbone, images: Tensor, stream: str) -> list[Tensor]:
        """The four NCHW maps of `images` through `backbone` with `stream`'s prompts."""
        _hiera_blocks(backbone)  # refuse before embedding, with the same message
        return self.forward_tokens(backbone, backbone.embed(images), stream)
