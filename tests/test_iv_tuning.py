"""IV-tuning: the paper's 6.06M on Swin-L, SimAM and the Hybrid Operation as defined, the
zeroed module reproduces the frozen encoder on every family, the aux image acts through the
EMPG, and only IV-tuning's own tensors train and are saved.

Random weights. Families: SAM 2 Hiera-T (windowed, q-pooling, global and padded blocks at
64 px), Swin-T at 64 px (padded, shifted and clipped windows), ViT-S with layer scale and a
class token, EVA02-T with layer scale (gamma), RoPE and SwiGLU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.eva import EvaBlock
from timm.models.hieradet_sam2 import MultiScaleBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from pipeline.models.backbone import Backbone, create_backbone
from pipeline.models.hiera_block import block_shortcut
from pipeline.models.iv_tuning import HybridOperation, IVTuning, SimAM

# name, input size, extra timm kwargs
FAMILIES = {
    "hiera": ("sam2_hiera_tiny", 64, {}),
    "swin": ("swin_tiny_patch4_window7_224", 64, {}),
    "vit": ("vit_small_patch16_224", 64, {"init_values": 0.1}),
    "eva": ("eva02_tiny_patch14_224", 224, {"init_values": 0.1}),
}
TIMM_BLOCKS = (MultiScaleBlock, SwinTransformerBlock, Block, EvaBlock)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbones() -> dict[str, Backbone]:
    return {
        family: create_backbone(name, weights="random", img_size=size, **kwargs).eval()
        for family, (name, size, kwargs) in FAMILIES.items()
    }


def images(family: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    size = FAMILIES[family][1]
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, size, size, generator=generator) for _ in range(2))


def zero_output_projections(ivt: IVTuning, empg: bool = True) -> None:
    """Zero every adapter's up-projection (and the EMPG's last 1x1): the module adds nothing."""
    layers = [pair.hybrid.up for block in ivt.blocks for pair in (block.attn, block.mlp)]
    layers += [pair.internal.up for block in ivt.blocks for pair in (block.attn, block.mlp)]
    layers += [ivt.empg.up] if empg else []
    for layer in layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def test_swin_large_count_is_the_papers():
    backbone = create_backbone("swin_large_patch4_window7_224", weights="random", img_size=224)
    ivt = IVTuning(backbone)
    # Paper: 6.06M trainable backbone parameters for Swin-L (aux patch embedding, EMPG, adapters).
    assert ivt.num_parameters == pytest.approx(6.06e6, rel=0.01)
    assert ivt.num_parameters == sum(p.numel() for p in ivt.parameters() if p.requires_grad)
    assert len(ivt.blocks) == 24
    patch_embed = sum(p.numel() for p in backbone.model.patch_embed.parameters())
    assert sum(p.numel() for p in ivt.aux_patch_embed.parameters()) == patch_embed


@pytest.mark.slow
def test_eva02_large_count_at_patch_16_is_the_papers():
    """Paper: 8.90M on EVA02-L, whose patch embedding the authors resampled to 16 (timm's patch-14
    model gives 8.71M, its aux patch embedding being smaller)."""
    backbone = create_backbone("eva02_large_patch14_224", weights="random", img_size=224, patch_size=16)
    assert backbone.model.patch_embed.proj.kernel_size == (16, 16)
    ivt = IVTuning(backbone)
    assert ivt.num_parameters == 8_897_604 and ivt.num_parameters == pytest.approx(8.90e6, rel=0.001)
    assert len(ivt.blocks) == 24


def test_simam_is_its_closed_form():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)  # not square: height and width stay apart
    out = SimAM()(x).numpy()
    for b in range(2):
        for c in range(3):
            v = x[b, c].numpy()
            mu = v.mean()
            var = ((v - mu) ** 2).sum() / (v.size - 1)
            e_inv = (v - mu) ** 2 / (4 * (var + 1e-4)) + 0.5
            np.testing.assert_allclose(out[b, c], v / (1 + np.exp(-e_inv)), rtol=1e-12)
    assert not list(SimAM().parameters())


def test_hybrid_operation_depthwise_step_touches_one_quarter():
    op = HybridOperation(16)
    assert (op.depthwise.in_channels, op.depthwise.out_channels, op.depthwise.groups) == (4, 4, 4)
    assert op.depthwise.kernel_size == (3, 3)
    x = torch.randn(2, 16, 6, 6)
    mixed = op.partial_conv(x)
    assert torch.equal(mixed[:, 4:], x[:, 4:])
    assert not torch.allclose(mixed[:, :4], x[:, :4])
    mixed[:, 4:].sum().backward()  # the untouched channels do not depend on the depthwise kernel
    assert op.depthwise.weight.grad is None or not op.depthwise.weight.grad.any()
    assert op(x).shape == x.shape
    with pytest.raises(ValueError, match="at least 4 channels"):
        HybridOperation(3)


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroed_module_reproduces_the_frozen_encoder(backbones, family):
    backbone = backbones[family]
    torch.manual_seed(0)
    ivt = IVTuning(backbone).eval()
    rgb, aux = images(family)
    size = rgb.shape[-1]
    with torch.no_grad():
        expected = backbone(rgb)
        adapted = ivt(backbone, rgb, aux)
        assert [tuple(m.shape) for m in adapted] == [
            (2, c, size // r, size // r) for c, r in zip(backbone.channels, backbone.reductions, strict=True)
        ]
        assert all(not torch.allclose(a, e, atol=1e-3) for a, e in zip(adapted, expected, strict=True))
        zero_output_projections(ivt)
        for a, e in zip(ivt(backbone, rgb, aux), expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


def test_swin_trained_on_crops_runs_on_full_frames():
    """The MFNet preset: a Swin with dynamic window masks (built for square crops) adapted by
    IV-tuning takes a non-square frame, and zeroed it still equals the frozen encoder there."""
    backbone = create_backbone("swin_tiny_patch4_window7_224", weights="random", img_size=64,
                               dynamic_img_size=True).eval()
    torch.manual_seed(0)
    ivt = IVTuning(backbone).eval()
    zero_output_projections(ivt)
    rgb, aux = (torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(i)) for i in range(2))
    with torch.no_grad():
        for a, e in zip(ivt(backbone, rgb, aux), backbone(rgb), strict=True):
            assert a.shape[-2:] == e.shape[-2:]
            torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


def expected_prompt(backbone: Backbone, block: int, previous_output: Tensor) -> Tensor:
    """Block `block`'s prompt stream from the previous block's output (B, h, w, C): as it is, or
    mapped to the block's width and grid where the block changes them (Hiera's shortcut, Swin's
    patch merging at a stage's start)."""
    model = backbone.model
    if family_of(backbone) == "hiera":
        return block_shortcut(model.blocks[block], previous_output)
    if family_of(backbone) == "swin":
        starts = np.cumsum([0] + [len(stage.blocks) for stage in model.layers])
        if block in starts:
            return model.layers[list(starts).index(block)].downsample(previous_output)
    return previous_output


def family_of(backbone: Backbone) -> str:
    return next(f for f, (name, _, _) in FAMILIES.items() if name == backbone.name)


@pytest.mark.parametrize("family", FAMILIES)
def test_ipa_reads_the_external_prompts_first_then_each_blocks_output(backbones, family):
    """Eq. 3 and Sec. 3.1: "the external modal prompts P_E are input to the Internal Prompt
    Adapter", and "Z^l is the output of the l-th encoder layer, which is the external modal
    prompts for the next encoder layer": block 0's IPAs read P_E (not Z^0 = Z_vis + P_E), block
    l's read block l-1's output Z_P."""
    backbone = backbones[family]
    torch.manual_seed(0)
    ivt = IVTuning(backbone).eval()
    seen: dict[str, Tensor] = {}

    def keep(name: str, output: bool):
        return lambda module, args, result: seen.__setitem__(name, result if output else args[0])

    hooks = [ivt.empg.register_forward_hook(keep("P_E", True))]
    for i, block in enumerate(ivt.blocks):
        hooks += [block.attn.internal.register_forward_hook(keep(f"ipa_attn{i}", False)),
                  block.mlp.internal.register_forward_hook(keep(f"ipa_mlp{i}", False)),
                  block.mlp.register_forward_hook(keep(f"out{i}", True))]
    with torch.no_grad():
        ivt(backbone, *images(family))
        for hook in hooks:
            hook.remove()
        assert torch.equal(seen["ipa_attn0"], seen["P_E"]) and torch.equal(seen["ipa_mlp0"], seen["P_E"])
        for i in range(1, len(ivt.blocks)):
            prompt = expected_prompt(backbone, i, seen[f"out{i - 1}"])
            torch.testing.assert_close(seen[f"ipa_attn{i}"], prompt, rtol=0, atol=1e-6)
            assert torch.equal(seen[f"ipa_mlp{i}"], seen[f"ipa_attn{i}"])


def test_adapters_act_on_the_residual_stream_even_when_drop_path_drops_every_branch():
    """Eq. 5-6: Z_ψ = ψ(Z) + Z and Z_P = Z_ψ + P_I on the residual stream, outside stochastic
    depth. With every droppable branch dropped in training, the last block's adapters still
    change the output."""
    backbone = create_backbone("swin_tiny_patch4_window7_224", weights="random", img_size=64, drop_path_rate=0.5)
    droppable = [m for m in backbone.modules() if type(m).__name__ == "DropPath"]
    blocks = sum(len(stage.blocks) for stage in backbone.model.layers)
    assert len(droppable) == 2 * (blocks - 1)  # both branches of every block but the first (rate 0)
    for module in droppable:
        module.drop_prob = 1.0
    torch.manual_seed(0)
    ivt = IVTuning(backbone, dropout=0.0).train()
    rgb, aux = images("swin")
    with torch.no_grad():
        before = ivt(backbone, rgb, aux)[-1]
        assert torch.equal(before, ivt(backbone, rgb, aux)[-1])  # nothing random is left
        last = ivt.blocks[-1].mlp
        last.hybrid.up.weight.add_(0.1)
        last.internal.up.weight.add_(0.1)
        assert not torch.allclose(ivt(backbone, rgb, aux)[-1], before, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_aux_acts_through_the_empg(backbones, family):
    backbone = backbones[family]
    ivt = IVTuning(backbone).eval()
    rgb, aux = images(family)
    other_aux = images(family, seed=1)[1]
    with torch.no_grad():
        zero_output_projections(ivt, empg=False)  # only the prompts can carry the aux image
        with_aux = ivt(backbone, rgb, aux)
        with_other = ivt(backbone, rgb, other_aux)
        assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(with_aux, with_other, strict=True))
        nn.init.zeros_(ivt.empg.up.weight)
        nn.init.zeros_(ivt.empg.up.bias)
        for a, b in zip(ivt(backbone, rgb, aux), ivt(backbone, rgb, other_aux), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_iv_tuning_trains_and_is_saved(backbones, family):
    backbone = backbones[family]
    ivt = IVTuning(backbone).train()
    # One adapter set per encoder block; the aux patch embedding starts as a copy of the RGB one.
    assert len(ivt.blocks) == sum(isinstance(m, TIMM_BLOCKS) for m in backbone.modules())
    rgb_embed = backbone.model.patch_embed.state_dict()
    aux_embed = ivt.aux_patch_embed.state_dict()
    assert rgb_embed.keys() == aux_embed.keys()
    assert all(torch.equal(aux_embed[k], rgb_embed[k]) for k in rgb_embed)

    rgb, aux = images(family)
    sum(m.square().mean() for m in ivt(backbone, rgb, aux)).backward()
    assert [n for n, p in ivt.named_parameters() if p.grad is None or not p.grad.any()] == []
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())

    state = ivt.state_dict()
    assert {key.split(".")[0] for key in state} == {"aux_patch_embed", "empg", "blocks"}
    backbone_storage = {t.data_ptr() for t in backbone.state_dict().values()}
    assert not backbone_storage & {t.data_ptr() for t in state.values()}


def test_refuses_mismatched_inputs_and_another_backbone(backbones):
    ivt = IVTuning(backbones["hiera"])
    rgb, aux = images("hiera")
    with pytest.raises(ValueError, match="shape of rgb"):
        ivt(backbones["hiera"], rgb, aux[:, :, :32])
    with pytest.raises(ValueError, match="built for sam2_hiera_tiny"):
        ivt(backbones["vit"], *images("vit"))
