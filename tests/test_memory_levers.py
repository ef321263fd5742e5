"""Memory levers trade time for memory (or take a faster path) and leave the numbers alone (issue 13).

Compiled blocks (`memory.compile`) and channels-last weights (`memory.channels_last`) give the
same loss and gradients as eager NCHW; bf16 autocast (the GPU trainers' `bf16-mixed`) stays
within bf16's precision of fp32.

Activation checkpointing (`memory.activation_checkpointing`, `Backbone.set_activation_checkpointing`):
every Stage-2 method's block loop (plain encoder with task LoRA or full fine-tuning, task prompts
with the modality LoRA, VPT, IV-tuning's adapters, CoLA's per-stream LoRA) and both PSST phases
(the masked encoder with the modality LoRA) give the same loss and the same gradient of every
trained tensor with and without it, on Hiera, Swin and ViT, in train mode with drop path on (the recomputation must draw the same masks). The block forwards are
counted, so a lever that silently does nothing fails: a checkpointed block runs twice per step
(forward, then again in backward), the others once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from pipeline.methods.stage2 import TaskModel
from pipeline.models.backbone import Backbone, create_backbone
from pipeline.training.trainer import ChannelsLast, apply_memory_levers, is_channels_last, memory_levers
from tests.ddp_equivalence import FixedSamples, build_module
from tests.test_stage2 import lora_root, make_lora, method, params  # noqa: F401 (fixtures)

SIZE = 64
FAMILIES = {  # narrow and shallow: the loops, not the widths, are under test
    "swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}),
    "vit": ("vit_tiny_patch16_224", {"init_values": 0.1, "depth": 4}),
}
CASES = [("hiera", m) for m in ("tp_mome", "vpt", "lora", "full", "iv_tuning", "cola")]
CASES += [("swin", "lora"), ("swin", "iv_tuning"), ("vit", "lora"), ("vit", "iv_tuning"), ("vit", "cola")]


def build(params: dict, family: str, name: str, lora_root: Path) -> TaskModel:  # noqa: F811
    torch.manual_seed(0)
    if family == "hiera":  # the smoke encoder, which the modality LoRA artifact was made for
        backbone = create_backbone(**{**params["backbone"], "drop_path_rate": 0.1})
    else:
        timm_name, kwargs = FAMILIES[family]
        backbone = create_backbone(timm_name, weights="random", img_size=SIZE, drop_path_rate=0.1, **kwargs)
    changes = {"cola": {**params["methods"]["cola"]["cola"], "reduction": 4}} if (family, name) == ("vit", "cola") else {}
    settings = method(params, name, **changes)  # (a ViT has one width: one CoLA reduction)
    lora_dirs = {"thermal": lora_root / "thermal"} if settings.modality_loras else None
    model = TaskModel(backbone, ["rgb", "thermal"], settings, head="segmentation", num_classes=5,
                      decoder={"embed_dim": 16}, lora_dirs=lora_dirs).train()
    with torch.no_grad():  # off the zero initialisations (LoRA's B, residual gates): every tensor gets a gradient
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter), alpha=0.02)
    return model


def encoder_blocks(backbone: Backbone) -> list[nn.Module]:
    if hasattr(backbone.model, "layers"):  # Swin
        return [block for stage in backbone.model.layers for block in stage.blocks]
    return list(backbone.model.blocks)


def step(model: TaskModel, stages: bool | list[int]) -> tuple[Tensor, dict[str, Tensor], list[int]]:
    """One forward + backward from the same RNG state: the loss, the gradients, and how often each
    encoder block ran (counted at its first norm, which every method's block forward calls once)."""
    model.backbone.set_activation_checkpointing(stages)
    blocks = encoder_blocks(model.backbone)
    calls = [0] * len(blocks)
    hooks = [b.norm1.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(blocks)]
    generator = torch.Generator().manual_seed(1)
    inputs = {s: torch.randn(2, 3, SIZE, SIZE, generator=generator) for s in ("rgb", "thermal")}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    try:
        loss = model(inputs).square().mean()
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.backbone.set_activation_checkpointing(False)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls


@pytest.mark.parametrize(("family", "name"), CASES)
def test_activation_checkpointing_leaves_loss_and_gradients_equal(params, lora_root, family, name):  # noqa: F811
    model = build(params, family, name, lora_root)
    loss, grads, calls = step(model, False)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())  # every trained tensor is reached
    for stages in ([1, 3],):  # checkpointed and plain blocks in one pass
        loss_ckpt, grads_ckpt, calls_ckpt = step(model, stages)
        torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
        assert grads_ckpt.keys() == grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grads_ckpt[key], grad, rtol=1e-5, atol=1e-7, msg=key)
        model.backbone.set_activation_checkpointing(stages)
        expected = [c * (2 if model.backbone.block_checkpointed(i) else 1) for i, c in enumerate(calls)]
        model.backbone.set_activation_checkpointing(False)
        assert calls_ckpt == expected
        assert any(c > 0 for c in calls) and calls_ckpt != calls


def test_stages_are_checked_and_recorded_and_eval_is_untouched(params, monkeypatch):  # noqa: F811
    hiera = apply_memory_levers(create_backbone(**params["backbone"]),
                                {"memory": {"activation_checkpointing": [0, 1], "compile": False}})
    assert hiera.checkpointed_stages == (0, 1)
    stage_of_block = [sum(i > e for e in hiera.model.stage_ends) for i in range(len(hiera.model.blocks))]
    assert [hiera.block_checkpointed(i) for i in range(len(stage_of_block))] == [s < 2 for s in stage_of_block]
    recorded = memory_levers(nn.ModuleDict({"encoder": hiera}))  # what train.json records
    assert recorded == {"activation_checkpointing": [0, 1], "compile": False, "channels_last": False}
    for bad in ([4], [0, 0], [True], "all"):
        with pytest.raises(ValueError, match="activation_checkpointing"):
            hiera.set_activation_checkpointing(bad)

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("checkpointed")

    monkeypatch.setattr("pipeline.models.backbone.grad_checkpoint", no_checkpoint)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():  # no gradients, nothing to recompute: evaluation and scoring run plainly
        hiera.eval()(x)
    with pytest.raises(AssertionError, match="checkpointed"):
        hiera(x)


@pytest.mark.parametrize("phase", ["warmup", "joint"])
def test_psst_phases_give_the_same_loss_and_gradients_with_checkpointing(phase):
    """Stage 1's masked encoder with the modality LoRA in its blocks; the joint phase's EMA
    teacher runs the same encoder without gradients (nothing to recompute)."""
    module = build_module(phase, None).train()
    batch = torch.utils.data.default_collate([FixedSamples(phase)[i] for i in range(2)])

    backbone = module.network.backbone
    calls = [0]
    for block in encoder_blocks(backbone):
        block.norm1.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def step(stages: bool | list[int]) -> tuple[Tensor, dict[str, Tensor]]:
        backbone.set_activation_checkpointing(stages)
        module.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        calls[0] = 0
        loss = module.training_step(batch, 0)
        loss.backward()
        backbone.set_activation_checkpointing(False)
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    loss, grads = step(False)
    plain_calls = calls[0]
    assert any(".lora_" in name for name in grads)
    for stages in ([0, 2],):
        loss_ckpt, grads_ckpt = step(stages)
        assert calls[0] > plain_calls  # the checkpointed blocks ran again in backward
        torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
        assert grads_ckpt.keys() == grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grads_ckpt[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def assert_same_step(reference: tuple, other: tuple, rtol: float, atol: float) -> None:
    loss, grads, _ = reference
    other_loss, other_grads, _ = other
    torch.testing.assert_close(other_loss, loss, rtol=rtol, atol=atol)
    assert other_grads.keys() == grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(other_grads[key], grad, rtol=rtol, atol=atol, msg=key)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients(params, tmp_path):  # noqa: F811
    """Every block through torch.compile, with prompts and the modality LoRA switched per stream
    (tp_mome), alone and inside activation checkpointing. The backend is dynamo's `eager`: graph capture is where compiling could change what
    runs (guards on the stream's adapter, the block arguments); inductor's kernels are torch's own.
    A four-block Hiera keeps the tracing within seconds on a CPU."""
    from torch._dynamo.utils import counters

    shallow = {**params, "backbone": {**params["backbone"], "stages": (1, 1, 1, 1), "global_att_blocks": (3,)}}
    make_lora(shallow, tmp_path / "thermal")
    model = build(shallow, "hiera", "tp_mome", tmp_path)
    eager = step(model, False)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    model.backbone.set_compile("eager")
    try:
        compiled = step(model, False)
        assert memory_levers(model)["compile"] == "eager"
        compiled_and_checkpointed = step(model, [1, 3])  # recomputed in backward, compiled again
    finally:
        model.backbone.set_compile(False)
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks did run compiled
    assert_same_step(eager, compiled, rtol=1e-5, atol=1e-6)
    assert_same_step(eager, compiled_and_checkpointed, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="compile"):
        model.backbone.set_compile("no_such_backend")


def test_channels_last_gives_the_same_loss_and_gradients(params, lora_root):  # noqa: F811
    """NHWC weights for every convolution (patch embedding, TP-MoME experts, FCOS towers): the
    convolutions then run channels-last, and the numbers stay."""
    torch.manual_seed(0)
    backbone = create_backbone(**params["backbone"])
    model = TaskModel(backbone, ["rgb", "thermal"], method(params, "tp_mome"), head="segmentation", num_classes=5,
                      decoder={"embed_dim": 16}, lora_dirs={"thermal": lora_root / "thermal"}).train()
    plain = step(model, False)
    assert not is_channels_last(model)
    ChannelsLast().setup(None, model, "fit")  # what the callback does to the training module
    assert is_channels_last(model)
    layouts = []
    projection = model.fusion.scales[0].project[0][0]  # a 1x1 conv inside TP-MoME
    hook = projection.register_forward_hook(
        lambda _, __, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    try:
        converted = step(model, False)
    finally:
        hook.remove()
    assert layouts == [True]
    assert_same_step(plain, converted, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_within_bf16_precision(params, lora_root):  # noqa: F811
    """`bf16-mixed` (fp32 weights, bf16 matmuls and convolutions) against fp32 on one step: the loss
    within 2%, and the whole gradient (every trained tensor, concatenated) within 10% relative
    error, which is what bf16's 8-bit mantissa allows through a dozen blocks, while the gradient of
    a differently initialised model is far off. (Per tensor the test would be meaningless: a bias
    before a norm layer has a gradient of ~0 in fp32, all rounding in bf16.)"""
    model = build(params, "hiera", "tp_mome", lora_root)
    loss, grads, _ = step(model, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, grads_bf16, _ = step(model, False)
    torch.testing.assert_close(loss_bf16.float(), loss, rtol=2e-2, atol=0)

    def relative_error(other: dict[str, Tensor]) -> float:
        flat = torch.cat([g.flatten() for g in grads.values()])
        return float((torch.cat([other[k].flatten().float() for k in grads]) - flat).norm() / flat.norm())

    assert relative_error(grads_bf16) < 0.1
    other = build(params, "hiera", "tp_mome", lora_root)
    with torch.no_grad():
        for parameter in other.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter), alpha=0.05)
    assert relative_error(step(other, False)[1]) > 0.5
