"""One SAM 2 Hiera block, re-run with seams for the parts that Stage-2 methods change.

timm's `MultiScaleBlock.forward` (timm 1.0.31: padding to whole windows, window partition,
shortcut projection and pooling at stage changes, layer scale, drop path, MLP) is copied here
once, so that no backbone module has to be wrapped or renamed (their paths are the LoRA keys
and the weights fingerprint). Three seams: `attend` replaces the attention call on the
normalised (windowed) tokens, `after_attn` / `after_mlp` transform the residual stream after
each branch has joined it (outside drop path, so stochastic depth never drops them). Task
prompts use the first, IV-tuning the other two; their tests check that with nothing changed
this still equals `block(x)`, so a timm upgrade that changes the block fails there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from timm.models.hieradet_sam2 import MultiScaleBlock, _calc_pad, window_partition, window_unpartition
from torch import Tensor

Branch = Callable[[Tensor], Tensor]


def hiera_block_forward(block: MultiScaleBlock, x: Tensor, *, attend: Branch | None = None,
                        after_attn: Branch | None = None, after_mlp: Branch | None = None) -> Tensor:
    """`block(x)` for tokens (B, H, W, C), with the given seams replaced."""
    normed = block.norm1(x)
    shortcut = x if block.dim == block.dim_out else _projected_shortcut(block, normed)
    x = normed

    window_size = block.window_size
    H, W = x.shape[1:3]
    if block.is_windowed:
        Hp, Wp, pad_h, pad_w = _calc_pad(H, W, window_size)
        x = window_partition(F.pad(x, (0, 0, 0, pad_w, 0, pad_h)), window_size)

    x = (attend or block.attn)(x)

    if block.is_windowed:
        if block.q_stride is not None:  # queries were pooled: smaller windows on a smaller grid
            window_size = (window_size[0] // block.q_stride[0], window_size[1] // block.q_stride[1])
            H, W = shortcut.shape[1:3]
            Hp, Wp, _, _ = _calc_pad(H, W, window_size)
        x = window_unpartition(x, window_size, (Hp, Wp))[:, :H, :W, :].contiguous()

    x = shortcut + block.drop_path1(block.ls1(x))
    if after_attn is not None:
        x = after_attn(x)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return after_mlp(x) if after_mlp is not None else x


def block_shortcut(block: MultiScaleBlock, x: Tensor) -> Tensor:
    """The block's residual path for its input (B, H, W, C): `x` within a stage; at a stage
    change, timm's projection of the normalised input to the new width, pooled to the new grid."""
    return x if block.dim == block.dim_out else _projected_shortcut(block, block.norm1(x))


def _projected_shortcut(block: MultiScaleBlock, normed: Tensor) -> Tensor:
    """timm's stage-change shortcut from the block's normalised input (norm1 runs once per block)."""
    shortcut = block.proj(normed)
    if block.pool is not None:
        shortcut = block.pool(shortcut.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return shortcut
