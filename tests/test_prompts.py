"""Deep task prompts for Hiera: the copied timm block still equals timm's, the prompted attention
equals plain softmax attention over [window; prompts], gradients reach only the active stream,
a modality LoRA on qkv acts on the prompts too, and non-Hiera encoders are refused.

Random weights; sam2_hiera_tiny at 64 px has windowed, q-pooling, global and padded blocks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from timm.models.hieradet_sam2 import MultiScaleBlock
from torch import Tensor

from pipeline.models.backbone import HieraBackbone, create_backbone
from pipeline.models.lora import LoraSettings, add_lora
from pipeline.models.prompts import TaskPrompts, prompted_block_forward

HIERA = "sam2_hiera_tiny"


@pytest.fixture(scope="module")
def backbone() -> HieraBackbone:
    return create_backbone(HIERA, weights="random", seed=0).eval()


def block_inputs(backbone: HieraBackbone, x: Tensor) -> list[Tensor]:
    """The token grid (B, H, W, C) that enters each block in the plain forward."""
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for b in backbone.model.blocks]
    try:
        backbone(x)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


@torch.no_grad()
def test_without_prompts_every_block_equals_timm(backbone):
    x = torch.randn(1, 3, 64, 64)
    blocks = backbone.model.blocks
    inputs = block_inputs(backbone, x)
    # The copy of timm's block is exercised on every kind of block it has to reproduce.
    assert any(b.is_windowed and b.q_stride is None for b in blocks)
    assert any(b.q_stride is not None for b in blocks)
    assert any(not b.is_windowed for b in blocks)
    assert any(b.is_windowed and t.shape[1] % b.window_size[0] for b, t in zip(blocks, inputs, strict=True))
    for block, tokens in zip(blocks, inputs, strict=True):
        torch.testing.assert_close(prompted_block_forward(block, tokens, None), block(tokens), rtol=0, atol=1e-6)

    # Layer scale and drop path too: same random draws under the same seed.
    stochastic = create_backbone(HIERA, weights="random", drop_path_rate=0.5, init_values=0.1).train()
    for block, tokens in zip(stochastic.model.blocks, inputs, strict=True):
        torch.manual_seed(0)
        expected = block(tokens)
        torch.manual_seed(0)
        torch.testing.assert_close(prompted_block_forward(block, tokens, None), expected, rtol=0, atol=1e-6)

    plain = backbone(x)
    no_prompts = TaskPrompts(backbone, ["rgb"], num_prompts=0).features(backbone, x, "rgb")
    assert [m.shape for m in no_prompts] == [m.shape for m in plain]
    for a, b in zip(no_prompts, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def reference_block(block: MultiScaleBlock, x: Tensor, prompts: Tensor) -> Tensor:
    """The block by hand: per window, softmax attention over [window tokens; prompts] and keep
    the window's outputs (queries max-pooled on q-pooling blocks); no padding needed here."""
    batch, height, width, channels = x.shape
    heads = block.attn.num_heads
    head_dim = block.dim_out // heads
    wh, ww = block.window_size if block.is_windowed else (height, width)
    sh, sw = block.q_stride or (1, 1)
    assert height % wh == 0 and width % ww == 0
    normed = block.norm1(x)
    attended = torch.zeros(batch, height // sh, width // sw, block.dim_out)
    for b in range(batch):
        for i in range(0, height, wh):
            for j in range(0, width, ww):
                window = normed[b, i:i + wh, j:j + ww].reshape(wh * ww, channels)
                sequence = torch.cat([window, prompts])
                q, k, v = block.attn.qkv(sequence).reshape(len(sequence), 3, heads, head_dim).unbind(1)
                if block.q_stride is not None:
                    grid = q[: wh * ww].reshape(wh, ww, -1).permute(2, 0, 1)
                    q = F.max_pool2d(grid, block.q_stride).permute(1, 2, 0).reshape(-1, heads, head_dim)
                weights = (torch.einsum("qhd,khd->hqk", q, k) * head_dim**-0.5).softmax(-1)
                out = torch.einsum("hqk,khd->qhd", weights, v)[: (wh // sh) * (ww // sw)]
                attended[b, i // sh:(i + wh) // sh, j // sw:(j + ww) // sw] = block.attn.proj(
                    out.reshape(wh // sh, ww // sw, -1)
                )
    shortcut = x
    if block.dim != block.dim_out:
        shortcut = F.max_pool2d(block.proj(normed).permute(0, 3, 1, 2), (sh, sw)).permute(0, 2, 3, 1)
    x = shortcut + attended
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize(
    ("index", "grid", "kind"),
    [(2, 8, "windowed"), (3, 8, "q-pool"), (5, 4, "global")],
)
@torch.no_grad()
def test_prompted_attention_equals_softmax_over_window_and_prompts(backbone, index, grid, kind):
    block = backbone.model.blocks[index]
    assert kind == ("q-pool" if block.q_stride else "windowed" if block.is_windowed else "global")
    assert block.attn.num_heads > 1
    torch.manual_seed(index)
    x = torch.randn(2, grid, grid, block.dim)
    prompts = torch.randn(3, block.dim)
    prompted = prompted_block_forward(block, x, prompts)
    torch.testing.assert_close(prompted, reference_block(block, x, prompts), rtol=1e-5, atol=1e-5)
    assert (prompted - block(x)).abs().max() > 1e-3  # the prompts took part


def test_prompts_change_features_and_train_only_the_active_stream(backbone):
    prompts = TaskPrompts(backbone, ["rgb", "thermal"], num_prompts=4)
    # streams x prompts x sum of block input widths (96*2 + 192*2 + 384*7 + 768 for tiny)
    assert prompts.num_parameters == 2 * 4 * 4032
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = backbone(x)
    maps = prompts.features(backbone, x, "thermal")
    for prompted, original in zip(maps, plain, strict=True):
        assert (prompted - original).abs().max() > 1e-4
    sum(m.square().mean() for m in maps).backward()
    for p in prompts.prompts["thermal"]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in prompts.prompts["rgb"])
    with pytest.raises(KeyError, match="unknown stream 'depth'"):
        prompts.features(backbone, x, "depth")


@torch.no_grad()
def test_prompts_go_through_the_lora_on_qkv():
    backbone = create_backbone(HIERA, weights="random", seed=0).eval()
    peft_model = add_lora(backbone, LoraSettings(rank=4, alpha=8.0))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the LoRA matter
            param.normal_(std=0.05)
    x = torch.randn(1, 3, 64, 64)
    with_lora = backbone(x)
    with peft_model.disable_adapter():
        without_lora = backbone(x)
    assert (with_lora[-1] - without_lora[-1]).abs().max() > 1e-3

    no_prompts = TaskPrompts(backbone, ["thermal"], num_prompts=0).features(backbone, x, "thermal")
    for a, b in zip(no_prompts, with_lora, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    qkv = backbone.model.blocks[0].attn.qkv
    assert isinstance(qkv, LoraLayer)  # peft swapped it in place; the prompts left the path alone
    seen = []
    hook = qkv.register_forward_hook(lambda _, args, out: seen.append(tuple(args[0].shape)))
    try:
        TaskPrompts(backbone, ["thermal"], num_prompts=2).features(backbone, x, "thermal")
    finally:
        hook.remove()
    assert (2, backbone.channels[0]) in seen


def test_only_hiera_is_supported(backbone):
    vit = create_backbone("vit_small_patch16_224", weights="random", img_size=64)
    with pytest.raises(TypeError, match="vit_small_patch16_224: task prompts .* Hiera"):
        TaskPrompts(vit, ["rgb"], num_prompts=2)
    prompts = TaskPrompts(backbone, ["rgb"], num_prompts=2)
    with pytest.raises(TypeError, match="vit_small_patch16_224"):
        prompts.features(vit, torch.randn(1, 3, 64, 64), "rgb")
    shorter = copy.deepcopy(backbone)
    del shorter.model.blocks[-1]
    with pytest.raises(ValueError, match="do not match"):
        prompts.features(shorter, torch.randn(1, 3, 64, 64), "rgb")
    with pytest.raises(ValueError, match="distinct"):
        TaskPrompts(backbone, ["rgb", "rgb"], num_prompts=2)
