"""IV-tuning: a frozen visible (RGB) encoder adapted to RGB + one auxiliary modality.

Paper: Zhang et al., "IV-tuning: Parameter-Efficient Transfer Learning for Infrared-Visible
Tasks", arXiv:2412.16654 (code: github.com/Yummy198913/IV-tuning). The visible encoder stays
frozen; the auxiliary image (thermal in the paper, any 3-channel encoded modality here) enters
only through modal prompts added to the visible tokens and through small adapters. The paper
reports 6.06M trainable backbone parameters on Swin-L and 8.90M on EVA02-L; this module has
6,062,404 on timm's Swin-L and 8,897,604 on EVA02-L with patch 16 (the authors converted
EVA02-L to patch 16; timm's patch-14 EVA02-L gives 8,713,284, the patch embedding being smaller).

Trainable (everything in this module; the encoder is passed in, never registered, so its
state dict holds only these tensors and one frozen encoder can serve other methods):

* `aux_patch_embed`: a copy of the encoder's patch embedding (for Swin with its LayerNorm),
  initialised from the frozen RGB one, for the auxiliary image.
* `empg`, the External Modal Prompt Generator: 1x1 projections of the visible and the aux
  patch tokens to d1; `HybridOperation` on the visible path, parameter-free `SimAM` on the
  aux path; sum; 1x1 back to C. The prompts are ADDED to the visible patch tokens.
* per block, after the attention residual and after the MLP residual (separate modules at
  the two positions): a `HybridAdapter` ψ (LN·γ+β, down to d2, `HybridOperation`, GELU,
  dropout, up) on the residual stream Z, and an `InternalPromptAdapter` (LN·γ+β, down to d3,
  `SimAM`, GELU, up, γ·x+β, GELU) on the prompt stream P, whose internal prompts P_I are
  added: Z -> Z_P = ψ(Z) + Z + IPA(P) (the paper's Eq. 5-6). The prompt stream is the external
  prompts P_E for the first block and the previous block's output Z^(l-1) after (Eq. 3: "Z^l
  ... is the external modal prompts for the next encoder layer").

Decisions the paper leaves open (the Swin-L count, 6,062,404 = 6.06M, is the arbiter where
one exists; see tests/test_iv_tuning.py):

* **Prompts once, at the input.** The EMPG runs once on the patch-embedding output (for
  hierarchical encoders, stage 1), as in the authors' code. One EMPG per stage would need
  an aux stream through the stages and costs ~68k more parameters on Swin-L (6.13M).
* **Where the prompts go:** on the patch tokens right after the patch embedding (after
  Swin's patch norm), before the position embedding (Hiera, ViT) and before class/register
  tokens are prepended, as in the authors' code.
* **Adapters at both positions are separate modules** (one HA + one IPA after attention,
  another pair after the MLP). Sharing one pair per block, as one released code path does,
  gives 3.04M on Swin-L, half the paper's number.
* **LN·γ+β is a LayerNorm with its own affine followed by a separate γ, β** (4C parameters).
  A LayerNorm whose affine *is* γ, β would give 5.92M on Swin-L, outside 1% of 6.06M.
* **Hybrid Operation:** `x + PConv(x)`, then `x + Conv1x1(ReLU(BN(Conv1x1(x))))`: one
  BatchNorm + ReLU between the two 1x1 convolutions, as in the authors' code. A BN + ReLU after
  each would add 6,160 parameters on Swin-L (6.07M, no longer the paper's 6.06M).
* **Placement** (Eq. 5-6, and the authors' code): each adapter pair acts on the residual
  stream right after the branch (attention, MLP) has been added to it, outside drop path, so
  stochastic depth (Swin-L's 0.2 in the paper's recipes) never drops the adapters, and a
  frozen layer scale does not shrink what they add.
* **Prompt stream per block** (Eq. 3), where the authors' Swin code updates it per stage
  (P_E through stage 1, then each stage's output): every block's IPA reads its input, except
  the first block's, which reads P_E. A block that changes width or grid (Hiera's first
  block of a stage) maps the prompt with its own frozen shortcut (projection + pooling), as
  its residual stream is mapped; Swin's stages start with the merge, so a block's input
  already has its width.
* **ViT / EVA prefix tokens** (class, register) bypass the adapters, whose spatial steps
  need the patch grid; they still mix with the patch tokens in attention (the authors' EVA
  code does the same with its class token). The EMPG sees patch tokens only.
* **Initialisation** as in the authors' code: adapter Linear layers truncated normal (std
  0.02) with zero bias, EMPG weights Xavier-uniform, γ=1, β=0. With the adapters' and the
  EMPG's output projections zeroed, the module reproduces the frozen encoder exactly.
* **SimAM on a 1x1 map** (H·W-1 = 0) uses n = 1 instead of dividing by zero.
* **Freezing:** constructing `IVTuning` sets `requires_grad=False` on the encoder, which
  the method defines as frozen, so no caller can train it by accident.

Block forwards are re-run here (timm 1.0.31's `MultiScaleBlock`, `SwinTransformerBlock`,
`Block`, `EvaBlock`) with only the adapters added: no backbone module is wrapped or renamed.
The test that zeroed adapters give `backbone(rgb)` exactly guards these copies against timm
changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.models.eva import EvaBlock
from timm.models.hieradet_sam2 import MultiScaleBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block as ViTBlock
from torch import Tensor, nn

from pipeline.models.backbone import (
    Backbone,
    HieraBackbone,
    SwinBackbone,
    ViTBackbone,
)
from pipeline.models.hiera_block import block_shortcut, hiera_block_forward


class SimAM(nn.Module):
    """Parameter-free attention (Yang et al., ICML 2021): `x * sigmoid(1 / e*)` per position.

    `1/e* = (x - mu)^2 / (4 (var + lambda)) + 0.5`, with mu and var (denominator H·W - 1)
    over each channel's spatial positions: distinctive positions get more weight.
    """

    def __init__(self, e_lambda: float = 1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: Tensor) -> Tensor:
        n = max(x.shape[-2] * x.shape[-1] - 1, 1)
        deviation = (x - x.mean(dim=(-2, -1), keepdim=True)).pow(2)
        variance = deviation.sum(dim=(-2, -1), keepdim=True) / n
        return x * torch.sigmoid(deviation / (4 * (variance + self.e_lambda)) + 0.5)


class HybridOperation(nn.Module):
    """Local spatial mixing in the bottleneck: a partial depthwise 3x3, then 1x1 channel mixing.

    `x + PConv(x)` where PConv (FasterNet's partial convolution) runs a depthwise 3x3 on the
    first quarter of the channels and passes the rest through, then
    `x + Conv1x1(ReLU(BN(Conv1x1(x))))`. Input and output are (B, c, H, W).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv_channels = channels // 4
        if self.conv_channels == 0:
            raise ValueError(f"HybridOperation needs at least 4 channels, got {channels}")
        self.depthwise = nn.Conv2d(
            self.conv_channels, self.conv_channels, 3, padding=1, groups=self.conv_channels
        )
        self.pointwise1 = nn.Conv2d(channels, channels, 1)
        self.norm = nn.BatchNorm2d(channels)
        self.pointwise2 = nn.Conv2d(channels, channels, 1)

    def partial_conv(self, x: Tensor) -> Tensor:
        """The depthwise step: 3x3 on the first quarter of the channels, the rest unchanged."""
        head, rest = x.split([self.conv_channels, x.shape[1] - self.conv_channels], dim=1)
        return torch.cat([self.depthwise(head), rest], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.partial_conv(x)
        return x + self.pointwise2(F.relu(self.norm(self.pointwise1(x))))


class ScaleShift(nn.Module):
    """`γ·x + β` per channel (last dim), optionally on a LayerNorm of x (LN·γ+β)."""

    def __init__(self, dim: int, normalize: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if normalize else nn.Identity()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x) * self.gamma + self.beta


def _spatial(op: nn.Module, x: Tensor) -> Tensor:
    """Apply a (B, C, H, W) operation to a (B, H, W, C) map."""
    return op(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class HybridAdapter(nn.Module):
    """Bottleneck adapter with local spatial mixing, on (B, H, W, C) maps; has its own residual."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = ScaleShift(dim, normalize=True)
        self.down = nn.Linear(dim, hidden)
        self.mix = HybridOperation(hidden)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        hidden = _spatial(self.mix, self.down(self.norm(x)))
        return x + self.up(self.dropout(F.gelu(hidden)))


class InternalPromptAdapter(nn.Module):
    """Prompts generated from the block's own features: SimAM-weighted bottleneck, (B, H, W, C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = ScaleShift(dim, normalize=True)
        self.down = nn.Linear(dim, hidden)
        self.simam = SimAM()
        self.up = nn.Linear(hidden, dim)
        self.scale = ScaleShift(dim, normalize=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.gelu(_spatial(self.simam, self.down(self.norm(x))))
        return F.gelu(self.scale(self.up(hidden)))


class BranchAdapter(nn.Module):
    """One {HA, IPA} pair on the residual stream after a branch: Z_P = HA(Z) + IPA(P) (Eq. 5-6;
    the HA carries the residual, ψ(Z) + Z); `prompt` P is the block's prompt stream."""

    def __init__(self, dim: int, d2: int, d3: int, dropout: float):
        super().__init__()
        self.hybrid = HybridAdapter(dim, d2, dropout)
        self.internal = InternalPromptAdapter(dim, d3)

    def forward(self, x: Tensor, prompt: Tensor) -> Tensor:
        return self.hybrid(x) + self.internal(prompt)


class BlockAdapters(nn.Module):
    """The two adapter pairs of one encoder block: after attention and after the MLP."""

    def __init__(self, dim: int, d2: int, d3: int, dropout: float):
        super().__init__()
        self.attn = BranchAdapter(dim, d2, d3, dropout)
        self.mlp = BranchAdapter(dim, d2, d3, dropout)


class ExternalModalPromptGenerator(nn.Module):
    """Prompts from visible and aux patch tokens (B, H, W, C) -> (B, H, W, C), to be added."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.visible = nn.Conv2d(dim, hidden, 1)
        self.aux = nn.Conv2d(dim, hidden, 1)
        self.mix = HybridOperation(hidden)
        self.simam = SimAM()
        self.up = nn.Conv2d(hidden, dim, 1)
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    def forward(self, visible: Tensor, aux: Tensor) -> Tensor:
        visible = self.mix(self.visible(visible.permute(0, 3, 1, 2)))
        aux = self.simam(self.aux(aux.permute(0, 3, 1, 2)))
        return self.up(visible + aux).permute(0, 2, 3, 1)


def block_widths(backbone: Backbone) -> list[int]:
    """Width of each block's branch outputs (what its adapters see), in forward order."""
    model = backbone.model
    if isinstance(backbone, HieraBackbone):
        return [block.dim_out for block in model.blocks]
    if isinstance(backbone, SwinBackbone):
        return [block.dim for stage in model.layers for block in stage.blocks]
    if isinstance(backbone, ViTBackbone):
        unsupported = {type(b).__name__ for b in model.blocks if type(b) not in (ViTBlock, EvaBlock)}
        if unsupported:
            raise TypeError(
                f"{backbone.name}: IV-tuning re-runs timm's Block / EvaBlock, not {sorted(unsupported)}"
            )
        return [model.embed_dim] * len(model.blocks)
    raise TypeError(f"{backbone.name}: IV-tuning supports Hiera, Swin and ViT/EVA backbones")


def _hiera_block(block: MultiScaleBlock, x: Tensor, prompt: Tensor, adapters: BlockAdapters) -> Tensor:
    """timm's Hiera block on (B, H, W, C) with the adapters after both residuals."""
    prompt = block_shortcut(block, prompt)  # to the block's output width and grid
    return hiera_block_forward(block, x, after_attn=lambda z: adapters.attn(z, prompt),
                               after_mlp=lambda z: adapters.mlp(z, prompt))


def _swin_block(block: SwinTransformerBlock, x: Tensor, prompt: Tensor, adapters: BlockAdapters) -> Tensor:
    """timm 1.0.31 `SwinTransformerBlock.forward` on (B, H, W, C), adapters after both residuals.

    `_attn` (shift, windows, attention, merge) is timm's own; timm flattens to (B, N, C) for
    the MLP, which acts per token, so it runs on the map here.
    """
    x = adapters.attn(x + block.drop_path1(block._attn(block.norm1(x))), prompt)
    return adapters.mlp(x + block.drop_path2(block.mlp(block.norm2(x))), prompt)


def _patch_grid(x: Tensor, grid: tuple[int, int], prefix: int) -> Tensor:
    """The patch tokens of a (B, prefix + h·w, C) sequence as a (B, h, w, C) map."""
    return x[:, prefix:].reshape(x.shape[0], *grid, x.shape[-1])


def _on_patch_tokens(adapter: BranchAdapter, x: Tensor, prompt: Tensor, grid: tuple[int, int],
                     prefix: int) -> Tensor:
    """Adapt the patch tokens of a (B, prefix + h·w, C) sequence on their grid; prefix unchanged."""
    return torch.cat([x[:, :prefix], adapter(_patch_grid(x, grid, prefix), prompt).flatten(1, 2)], dim=1)


def _vit_block(
    block: ViTBlock | EvaBlock,
    x: Tensor,
    prompt: Tensor,
    rope: Tensor | None,
    adapters: BlockAdapters,
    grid: tuple[int, int],
    prefix: int,
) -> Tensor:
    """timm 1.0.31 `Block.forward` / `EvaBlock.forward` (no mask), adapters after both residuals."""
    if isinstance(block, EvaBlock):
        attn = block.attn(block.norm1(x), rope=rope)
        attn = attn if block.gamma_1 is None else block.gamma_1 * attn
    else:
        attn = block.ls1(block.attn(block.norm1(x)))
    x = _on_patch_tokens(adapters.attn, x + block.drop_path1(attn), prompt, grid, prefix)
    if isinstance(block, EvaBlock):
        mlp = block.mlp(block.norm2(x))
        mlp = mlp if block.gamma_2 is None else block.gamma_2 * mlp
    else:
        mlp = block.ls2(block.mlp(block.norm2(x)))
    return _on_patch_tokens(adapters.mlp, x + block.drop_path2(mlp), prompt, grid, prefix)


class IVTuning(nn.Module):
    """IV-tuning's trainable part for one frozen encoder (module docstring).

    `forward(backbone, rgb, aux)` returns the four NCHW maps of the prompted visible stream,
    shaped like `backbone(rgb)`. Built for one backbone: a different one is refused.
    """

    def __init__(self, backbone: Backbone, d1: int = 8, d2: int = 64, d3: int = 8, dropout: float = 0.1):
        super().__init__()
        self.backbone_name = backbone.name
        self.block_widths = block_widths(backbone)
        patch_embed = backbone.model.patch_embed
        self.aux_patch_embed = copy.deepcopy(patch_embed).requires_grad_(True)
        self.empg = ExternalModalPromptGenerator(patch_embed.proj.out_channels, d1)
        self.blocks = nn.ModuleList(BlockAdapters(w, d2, d3, dropout) for w in self.block_widths)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        backbone.requires_grad_(False)

    @property
    def num_parameters(self) -> int:
        """Trainable backbone-side size: aux patch embedding, EMPG and all adapters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, backbone: Backbone, rgb: Tensor, aux: Tensor) -> list[Tensor]:
        if block_widths(backbone) != self.block_widths:
            raise ValueError(
                f"these IV-tuning modules were built for {self.backbone_name}, "
                f"not for {backbone.name} with different blocks"
            )
        if aux.shape != rgb.shape:
            raise ValueError(f"aux {tuple(aux.shape)} must have the shape of rgb {tuple(rgb.shape)}")
        backbone.check_input(rgb)
        visible = backbone.model.patch_embed(rgb)  # (B, h, w, C) in every supported family
        prompts = self.empg(visible, self.aux_patch_embed(aux))  # P_E (Eq. 7)
        tokens = visible + prompts  # Z^0 (Eq. 2)
        if isinstance(backbone, HieraBackbone):
            return self._hiera(backbone, tokens, prompts)
        if isinstance(backbone, SwinBackbone):
            return self._swin(backbone, tokens, prompts)
        return self._vit(backbone, tokens, prompts, rgb.shape[-2:])

    def _hiera(self, backbone: HieraBackbone, tokens: Tensor, prompts: Tensor) -> list[Tensor]:
        model = backbone.model
        tokens = backbone.add_pos_embed(tokens)
        maps = []
        for i, (block, adapters) in enumerate(zip(model.blocks, self.blocks, strict=True)):
            prompt = prompts if i == 0 else tokens  # P_E, then the previous block's output Z^(l-1)
            tokens = backbone.run_block(i, _hiera_block, block, tokens, prompt, adapters)
            if i in model.stage_ends:
                maps.append(tokens.permute(0, 3, 1, 2))
        return maps

    def _swin(self, backbone: SwinBackbone, tokens: Tensor, prompts: Tensor) -> list[Tensor]:
        blocks: Iterator[tuple[int, BlockAdapters]] = enumerate(self.blocks)
        maps = []
        for stage in backbone.model.layers:  # timm's SwinTransformerStage.forward, block by block
            tokens = stage.downsample(tokens)
            for block in stage.blocks:
                index, adapters = next(blocks)
                prompt = prompts if index == 0 else tokens  # P_E, then the previous block's output Z^(l-1)
                tokens = backbone.run_block(index, _swin_block, block, tokens, prompt, adapters)
            maps.append(tokens.permute(0, 3, 1, 2).contiguous())
        return maps

    def _vit(self, backbone: ViTBackbone, tokens: Tensor, prompts: Tensor, size: torch.Size) -> list[Tensor]:
        """The backbone's ViT / EVA forward (timm's `forward_intermediates`) with the adapters."""
        grid = tuple(tokens.shape[1:3])
        x, rope = backbone.position(tokens)
        prefix = backbone.model.num_prefix_tokens
        taken = []
        for i, (block, adapters) in enumerate(zip(backbone.model.blocks, self.blocks, strict=True)):
            prompt = prompts if i == 0 else _patch_grid(x, grid, prefix)  # P_E, then Z^(l-1)
            x = backbone.run_block(i, _vit_block, block, x, prompt, backbone.block_rope(rope, i), adapters, grid,
                                   prefix)
            if i in backbone.block_indices:
                taken.append(x)
        return backbone.pyramid(taken, size)
