"""CoLA (cross-modal low-rank adaptation): two streams through one frozen encoder, each adapted
by LoRA plus a low-rank path that the *other* stream conditions.

Method comparison baseline `cola` (design.md section 3). Both streams ("rgb" and one auxiliary
modality, e.g. "thermal") run in lockstep, block by block, through the same frozen encoder. In
stream s every adapted linear layer computes

    y = W x + (alpha/r) B A x + s_l B_c phi(c) A_c x

with A, A_c (r x in) Kaiming-uniform as in LoRA, B, B_c (out x r) zero, s_l a learnable scalar
initialised on its own (`s_init`), and phi(c) an r x r matrix per sample from a hypernetwork
(Linear C -> C/k, GELU, LayerNorm, Linear -> r^2, LayerNorm(r^2), as released) of c, the other
stream's features at the same point, pooled over its tokens (mean, or the class token). Every
stream and layer has its own A, B, A_c, B_c, hypernetwork and s_l. Adapted layers ("targets"):
q, k, v (three projections with their own adapters, although timm fuses them in `attn.qkv`),
the attention output projection "o", and the MLP's fc1 and fc2.

The paper's settings (Tables 7-9): rank 16, LoRA scaling alpha = 8 (alpha/r = 0.5), s_init 0.5
(vision-language) or 0.1 (audio-visual; the default here: AVS is the dense, hierarchical-encoder
setting closest to RGB-X segmentation), reduction k = 16, and per stage [2, 4, 8, 16] for a
hierarchical encoder (Swin-L in AVS; Hiera here), so that an early, narrow stage keeps a
usable hidden width (Hiera-B+ stage 1: 112/2 = 56 instead of 112/16 = 7).

Progressive propagation: c is refreshed at three points of every block, as the released code
takes it:

* before qkv: the other stream's residual stream entering the block (the input of `norm1`),
  for q, k and v;
* after attention: the other stream's attention output before the projection (the input of
  `attn.proj`), for o;
* before the MLP: the other stream's residual stream after attention (the input of `norm2`),
  for fc1 *and* fc2.

Choices, and why:

* **fc2 reads the fc1-point features**, not the other stream's hidden activations: the paper
  names three refresh points per block and the MLP is one of them; its 12.5M parameters over
  LoRA on two ViT-B streams are only reached with hypernetworks of input width C everywhere (a
  4C-wide fc2 hypernetwork would add another 14.2M); and the hidden activations are a 4C-wide
  code of the very same features.
* **The hypernetwork as released** (loralib `CMLinear`'s `Mlp`): GELU, then a LayerNorm on the
  hidden layer and one on the r x r output, eps=1e-6; the paper's Eq. 6 names "two linear
  layers with a non-linear function and layer normalization" without placing them.
* **Pooling** (`pool`): `mean` over every token of the image, or `cls` (the class token, ViT
  only), the two the paper allows. Hiera attends inside windows (padded to whole windows on
  small grids) and pools its queries at stage changes; c is the mean over the image's real
  tokens, never per window or over padding. A ViT's mean includes its class/register tokens:
  they are part of the sequence each layer sees. phi is per sample, shared by all windows.
* **q, k, v as three projections on the fused weight.** `attn.qkv(x)` already returns
  [W_q x; W_k x; W_v x] (rows split into thirds); the three adapters' deltas are concatenated
  and added to it. Keeping timm's single matmul makes the zero-initialised model equal the
  frozen encoder bit for bit.
* **The blocks are re-run here** (dual-stream copies of timm 1.0.31's `MultiScaleBlock.forward`
  and ViT `Block.forward`, including padding, q-pooling, layer scale, drop path and timm's
  fused/unfused attention switch), so nothing in the encoder is wrapped or renamed: its
  module paths, fingerprint and modality LoRAs stay as they are. tests/test_cola.py checks that
  with B = B_c = 0 both streams equal the frozen backbone exactly, so a timm upgrade that
  changes a block fails there.
* **The encoder is passed in, not held**: a checkpoint of this module holds only its own
  tensors. Freezing the encoder is the caller's job (stage 2 sets `requires_grad`), as for
  every other method.
* `cross=False` builds plain LoRA (A, B only) on the same layers, for the "LoRA r=16 on the same
  layers" comparison and its parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.hieradet_sam2 import (
    MultiScaleAttention,
    MultiScaleBlock,
    _calc_pad,
    window_partition,
    window_unpartition,
)
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from pipeline.models.backbone import Backbone, HieraBackbone, ViTBackbone

TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
QKV = ("q", "k", "v")
POOLS = ("mean", "cls")

Pair = tuple[Tensor, Tensor]
Layers = tuple[nn.ModuleDict, nn.ModuleDict]  # one block's adapters: (stream 0's, stream 1's)


class CoLAAdapter(nn.Module):
    """The trainable part of one adapted projection in one stream: returns only the delta,
    `(alpha/r) B A x + s B_c phi(c) A_c x`, that is added to the frozen `W x`."""

    def __init__(
        self, in_features: int, out_features: int, cond_features: int, rank: int, alpha: float, cross: bool,
        s_init: float = 0.1, reduction: int = 16,
    ):
        super().__init__()
        self.rank = rank
        self.scaling = alpha / rank
        self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, in_features), a=math.sqrt(5)))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.cross = cross
        if cross:
            self.A_c = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, in_features), a=math.sqrt(5)))
            self.B_c = nn.Parameter(torch.zeros(out_features, rank))
            hidden = max(1, cond_features // reduction)
            self.hyper = nn.Sequential(
                nn.Linear(cond_features, hidden),
                nn.GELU(),
                nn.LayerNorm(hidden, eps=1e-6),
                nn.Linear(hidden, rank * rank),
                nn.LayerNorm(rank * rank, eps=1e-6),
            )
            self.s = nn.Parameter(torch.tensor(float(s_init)))

    def phi(self, c: Tensor) -> Tensor:
        """Pooled other-stream features (B, C) -> one r x r mixing matrix per sample (B, r, r)."""
        return self.hyper(c).view(-1, self.rank, self.rank)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (N, ..., in) whose first dim is the batch or the batch's windows (sample-major, as
        timm partitions them); c (B, C) -> the delta (N, ..., out).

        Both paths run as one down- and one up-projection, [B, B_c] [(alpha/r) A x; s phi A_c x]:
        x and the output are the large tensors, so reading and writing each once (and scaling
        the r-wide codes, not the output) is what makes the adapter cheap next to `W x`."""
        if not self.cross:
            return F.linear(F.linear(x, self.A) * self.scaling, self.B)
        codes = F.linear(x, torch.cat([self.A, self.A_c]))  # (N, ..., 2r): [A x; A_c x]
        lora, cross = codes.split(self.rank, dim=-1)
        cross = cross.reshape(len(c), -1, self.rank) @ self.phi(c).transpose(1, 2)  # phi A_c x, per token, as rows
        codes = torch.cat([lora * self.scaling, cross.reshape(lora.shape) * self.s], dim=-1)
        return F.linear(codes, torch.cat([self.B, self.B_c], dim=1))


def _layer_shapes(block: nn.Module) -> dict[str, tuple[int, int, int]]:
    """target -> (in, out, width of its c) in a Hiera or ViT block."""
    attn, mlp = block.attn, block.mlp
    qkv = (attn.qkv.in_features, attn.qkv.out_features // 3, attn.qkv.in_features)
    return {
        **dict.fromkeys(QKV, qkv),
        "o": (attn.proj.in_features, attn.proj.out_features, attn.proj.in_features),
        "fc1": (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc1.in_features),
        "fc2": (mlp.fc2.in_features, mlp.fc2.out_features, mlp.fc1.in_features),
    }


def _blocks(backbone: Backbone) -> nn.Sequential:
    """The encoder's blocks, once they are known to be the timm blocks re-run here."""
    if isinstance(backbone, HieraBackbone):
        expected = (MultiScaleBlock, MultiScaleAttention)
    elif isinstance(backbone, ViTBackbone) and type(backbone.model) is VisionTransformer:
        expected = (Block, Attention)
    else:
        raise TypeError(
            f"{backbone.name}: CoLA is implemented for SAM 2 Hiera and plain ViT/DINOv2 backbones, "
            f"not for {type(backbone.model).__name__}"
        )
    for block in backbone.model.blocks:
        if (type(block), type(block.attn), type(block.mlp)) != (*expected, Mlp):
            raise TypeError(
                f"{backbone.name}: block {type(block).__name__} with {type(block.attn).__name__} and "
                f"{type(block.mlp).__name__} is not the timm block CoLA re-runs ({expected[0].__name__})"
            )
    return backbone.model.blocks


def _each(fn: Callable[..., Tensor], *pairs: tuple) -> Pair:
    """`fn` applied per stream to the streams' arguments."""
    return tuple(fn(*args) for args in zip(*pairs, strict=True))


def _token_mean(tokens: Tensor) -> Tensor:
    """(B, H, W, C) or (B, N, C) -> (B, C): the mean over every token of each sample."""
    return tokens.flatten(1, -2).mean(dim=1)


def _class_token(tokens: Tensor) -> Tensor:
    """(B, N, C) -> (B, C): the class token (a ViT's first)."""
    return tokens[:, 0]


POOLING = {"mean": _token_mean, "cls": _class_token}


def _cross(features: Pair, pool: Callable[[Tensor], Tensor] = _token_mean) -> Pair:
    """Each stream's c: the *other* stream's pooled features."""
    return pool(features[1]), pool(features[0])


def _adapted(linear: nn.Linear, layer: nn.ModuleDict, target: str, x: Tensor, c: Tensor) -> Tensor:
    y = linear(x)
    return y + layer[target](x, c) if target in layer else y


def _qkv(qkv: nn.Linear, layer: nn.ModuleDict, x: Tensor, c: Tensor) -> Tensor:
    """The fused qkv output with the q, k and v adapters' deltas on its three row blocks."""
    y = qkv(x)
    if not any(t in layer for t in QKV):
        return y
    width = y.shape[-1] // 3
    deltas = [layer[t](x, c) if t in layer else y.new_zeros(*y.shape[:-1], width) for t in QKV]
    return y + torch.cat(deltas, dim=-1)


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, dropout: nn.Dropout | None) -> Tensor:
    """timm's attention core, fused or not as `attn.fused_attn` says (no mask)."""
    if attn.fused_attn:
        p = dropout.p if dropout is not None and attn.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (dropout(weights) if dropout is not None else weights) @ v


def _mlp_half(block: nn.Module, layers: Layers, xs: Pair, pool: Callable[[Tensor], Tensor]) -> Pair:
    """The MLP residual shared by both block families (timm `Mlp.forward`, adapted)."""
    mlp = block.mlp
    normed = _each(block.norm2, xs)
    cs = _cross(xs, pool)  # the residual stream entering norm2, as released

    def branch(layer: nn.ModuleDict, x: Tensor, c: Tensor) -> Tensor:
        hidden = mlp.norm(mlp.drop1(mlp.act(_adapted(mlp.fc1, layer, "fc1", x, c))))
        return mlp.drop2(_adapted(mlp.fc2, layer, "fc2", hidden, c))

    outs = _each(branch, layers, normed, cs)
    return _each(lambda x, out: x + block.drop_path2(block.ls2(out)), xs, outs)


def _hiera_attention(attn: MultiScaleAttention, layer: nn.ModuleDict, x: Tensor, c: Tensor) -> Tensor:
    """timm `MultiScaleAttention.forward` up to (not including) `proj`, with q/k/v adapted."""
    batch, h, w, _ = x.shape
    q, k, v = _qkv(attn.qkv, layer, x, c).reshape(batch, h * w, 3, attn.num_heads, -1).unbind(2)
    if attn.q_pool is not None:
        q = attn.q_pool(q.reshape(batch, h, w, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        h, w = q.shape[1:3]
        q = q.reshape(batch, h * w, attn.num_heads, -1)
    out = _attend(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None)
    return out.transpose(1, 2).reshape(batch, h, w, -1)


def _hiera_block(block: MultiScaleBlock, layers: Layers, xs: Pair, pool: Callable[[Tensor], Tensor]) -> Pair:
    """Both streams through one Hiera block: timm 1.0.31 `MultiScaleBlock.forward`, adapted."""
    normed = _each(block.norm1, xs)
    shortcuts = xs
    if block.dim != block.dim_out:
        def shortcut(x: Tensor) -> Tensor:
            x = block.proj(x)
            return x if block.pool is None else block.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

        shortcuts = _each(shortcut, normed)
    c_qkv = _cross(xs, pool)  # the residual stream entering norm1: whole image, before padding and windows

    window_size = block.window_size
    H, W = normed[0].shape[1:3]
    windows = normed
    if block.is_windowed:
        Hp, Wp, pad_h, pad_w = _calc_pad(H, W, window_size)
        windows = _each(lambda x: window_partition(F.pad(x, (0, 0, 0, pad_w, 0, pad_h)), window_size), normed)
    attended = _each(lambda layer, x, c: _hiera_attention(block.attn, layer, x, c), layers, windows, c_qkv)
    if block.q_stride is not None:  # queries were pooled: smaller windows on a smaller grid
        window_size = (block.window_size[0] // block.q_stride[0], block.window_size[1] // block.q_stride[1])
        H, W = shortcuts[0].shape[1:3]
        Hp, Wp, _, _ = _calc_pad(H, W, window_size)

    def to_image(x: Tensor) -> Tensor:
        return window_unpartition(x, window_size, (Hp, Wp))[:, :H, :W, :] if block.is_windowed else x

    c_o = _cross(attended, lambda x: pool(to_image(x)))  # real tokens only, not padding
    outs = _each(lambda layer, x, c: _adapted(block.attn.proj, layer, "o", x, c), layers, attended, c_o)
    if block.is_windowed:
        outs = _each(lambda x: to_image(x).contiguous(), outs)
    xs = _each(lambda s, out: s + block.drop_path1(block.ls1(out)), shortcuts, outs)
    return _mlp_half(block, layers, xs, pool)


def _vit_attention(attn: Attention, layer: nn.ModuleDict, x: Tensor, c: Tensor) -> Tensor:
    """timm `Attention.forward` (timm.layers, 1.0.31) up to the input of `proj`, q/k/v adapted."""
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = _qkv(attn.qkv, layer, x, c).reshape(batch, n, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = _attend(attn, attn.q_norm(q), attn.k_norm(k), v, attn.attn_drop)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn.attn_dim))
    return out if gate is None else out * gate


def _vit_block(block: Block, layers: Layers, xs: Pair, pool: Callable[[Tensor], Tensor]) -> Pair:
    """Both streams through one ViT block: timm 1.0.31 `Block.forward` (no mask), adapted."""
    attn = block.attn
    normed = _each(block.norm1, xs)
    attended = _each(lambda layer, x, c: _vit_attention(attn, layer, x, c), layers, normed, _cross(xs, pool))

    def project(layer: nn.ModuleDict, x: Tensor, c: Tensor) -> Tensor:
        return attn.proj_drop(_adapted(attn.proj, layer, "o", x, c))

    outs = _each(project, layers, attended, _cross(attended, pool))
    xs = _each(lambda x, out: x + block.drop_path1(block.ls1(out)), xs, outs)
    return _mlp_half(block, layers, xs, pool)


class CoLA(nn.Module):
    """Cross-modal low-rank adaptation of one frozen encoder for two streams (module docstring).

    Parameters are `adapters.<stream>.<block>.<target>.{A, B, A_c, B_c, s, hyper.*}`.
    `cross=False` gives plain LoRA on the same layers (`A`, `B` only), same forward.
    `reduction`: the hypernetworks' C/k, one k, or one per stage of a hierarchical encoder.
    """

    def __init__(
        self,
        backbone: Backbone,
        streams: tuple[str, str] = ("rgb", "thermal"),
        rank: int = 16,
        alpha: float = 8.0,
        targets: Sequence[str] = TARGETS,
        cross: bool = True,
        s_init: float = 0.1,
        reduction: int | Sequence[int] = 16,
        pool: str = "mean",
    ):
        super().__init__()
        blocks = _blocks(backbone)
        has_class_token = getattr(backbone.model, "cls_token", None) is not None
        if pool not in POOLS or (pool == "cls" and not has_class_token):
            raise ValueError(f"pool must be one of {list(POOLS)} ('cls' needs an encoder with a class token), "
                             f"got {pool!r} for {backbone.name}")
        stage_of = _stage_of_blocks(backbone, len(blocks))
        factors = [reduction] * (max(stage_of) + 1) if isinstance(reduction, int) else list(reduction)
        if len(factors) != max(stage_of) + 1 or min(factors) < 1:
            raise ValueError(f"reduction must be one factor >= 1 or one per stage ({max(stage_of) + 1} for "
                             f"{backbone.name}), got {reduction!r}")
        if len(streams) != 2 or streams[0] == streams[1]:
            raise ValueError(f"CoLA needs two distinct streams, got {list(streams)}")
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise ValueError(f"targets must be a non-empty subset of {list(TARGETS)}, got {list(targets)}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.streams = tuple(streams)
        self.rank = rank
        self.alpha = float(alpha)
        self.targets = tuple(t for t in TARGETS if t in targets)
        self.cross = cross
        self.pool = POOLING[pool]
        self._layout = [_layer_shapes(block) for block in blocks]
        self.adapters = nn.ModuleDict({
            stream: nn.ModuleList(
                nn.ModuleDict({
                    t: CoLAAdapter(*shapes[t], rank=rank, alpha=self.alpha, cross=cross, s_init=s_init,
                                   reduction=factors[stage])
                    for t in self.targets
                })
                for shapes, stage in zip(self._layout, stage_of, strict=True)
            )
            for stream in self.streams
        })

    @property
    def num_parameters(self) -> int:
        """Trainable size (every CoLA tensor is trainable; the encoder is not counted)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, backbone: Backbone, inputs: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
        """Both streams' images (B, C, H, W each, same B) -> each stream's four NCHW maps,
        as `backbone(x)` returns them."""
        blocks = _blocks(backbone)
        if [_layer_shapes(block) for block in blocks] != self._layout:
            raise ValueError(f"{backbone.name}: its blocks do not match the ones this CoLA was built for")
        if set(inputs) != set(self.streams):
            raise KeyError(f"expected inputs for streams {list(self.streams)}, got {sorted(inputs)}")
        images = tuple(inputs[s] for s in self.streams)
        if images[0].shape[0] != images[1].shape[0]:
            raise ValueError(f"the streams' batch sizes differ: {[x.shape[0] for x in images]}")
        hiera = isinstance(backbone, HieraBackbone)
        block_forward = _hiera_block if hiera else _vit_block
        tokens = _each(backbone.embed, images) if hiera else _each(lambda x: _vit_embed(backbone, x), images)

        taken: list[Pair] = []
        take = backbone.model.stage_ends if hiera else backbone.block_indices
        per_block = zip(*(self.adapters[s] for s in self.streams), strict=True)
        for i, (block, layers) in enumerate(zip(blocks, per_block, strict=True)):
            tokens = backbone.run_block(i, block_forward, block, layers, tokens, self.pool)
            if i in take:
                taken.append(tokens)
        maps = [
            [t.permute(0, 3, 1, 2) for t in stream_tokens] if hiera
            else backbone.pyramid(stream_tokens, image.shape[-2:])
            for stream_tokens, image in zip(zip(*taken), images, strict=True)
        ]
        return dict(zip(self.streams, maps, strict=True))


def _stage_of_blocks(backbone: Backbone, blocks: int) -> list[int]:
    """The stage each block belongs to: Hiera's four (ending at `stage_ends`); one for a ViT."""
    if not isinstance(backbone, HieraBackbone):
        return [0] * blocks
    ends = list(backbone.model.stage_ends)
    return [sum(i > end for end in ends) for i in range(blocks)]


def _vit_embed(backbone: ViTBackbone, x: Tensor) -> Tensor:
    """Images -> the token sequence entering block 0 (a ViT: no rotary embedding)."""
    backbone.check_input(x)
    return backbone.position(backbone.model.patch_embed(x))[0]
