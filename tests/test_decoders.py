"""The all-MLP task heads and the Stage-2 task losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.decoders import AllMLPHead, ProgressiveSODHead, SODHead, build_decoder
from pipeline.models.task_losses import build_loss, segmentation_loss, sod_loss, soft_iou_loss

CHANNELS = [4, 6, 8, 10]


def features(batch: int = 2, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, size // 2**i, size // 2**i, generator=g) for i, c in enumerate(CHANNELS)]


def concat_then_fuse(head: AllMLPHead, feats: list[torch.Tensor]) -> torch.Tensor:
    """SegFormer's head as its paper reads: project, upsample to stride 4, concatenate, fuse
    (BatchNorm in its current mode), classify; no dropout."""
    up = [
        F.interpolate(F.conv2d(f, p.weight, p.bias), size=feats[0].shape[-2:], mode="bilinear", align_corners=False)
        for p, f in zip(head.project, feats)
    ]
    bn = head.fuse[1]
    fused = F.batch_norm(F.conv2d(torch.cat(up, dim=1), head.fuse[0].weight), bn.running_mean, bn.running_var,
                         bn.weight, bn.bias, training=head.training, eps=bn.eps)
    return F.conv2d(F.relu(fused), head.classify.weight, head.classify.bias)


def test_heads_predict_at_stride_4_or_the_requested_size():
    head = AllMLPHead(CHANNELS, num_classes=5, embed_dim=8)
    assert head(features()).shape == (2, 5, 16, 16)
    assert head(features(), out_size=(64, 48)).shape == (2, 5, 64, 48)
    sod = build_decoder("sod", CHANNELS, 1, embed_dim=8)
    assert isinstance(sod, SODHead) and sod(features(), (64, 64)).shape == (2, 1, 64, 64)
    assert build_decoder("segmentation", CHANNELS, 3, embed_dim=8, dropout=0.0)(features()).shape == (
        2,
        3,
        16,
        16,
    )
    with pytest.raises(ValueError, match="one saliency channel"):
        build_decoder("sod", CHANNELS, 2)
    with pytest.raises(ValueError, match="segmentation, sod, detection"):
        build_decoder("depth", CHANNELS, 1)


def test_head_matches_a_direct_computation_and_uses_every_scale():
    torch.manual_seed(0)
    head = AllMLPHead(CHANNELS, num_classes=3, embed_dim=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        head.fuse[1].running_mean.normal_()
        head.fuse[1].running_var.uniform_(0.5, 2.0)
    feats = features()
    with torch.no_grad():
        expected = concat_then_fuse(head, feats)
        logits = head(feats)
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(head(feats, (32, 32)), F.interpolate(expected, (32, 32), mode="bilinear"))
        for i in range(len(CHANNELS)):
            zeroed = [torch.zeros_like(f) if j == i else f for j, f in enumerate(feats)]
            assert not torch.allclose(head(zeroed), logits)


def test_head_trains_as_the_concat_then_fuse_reading():
    """The head fuses each scale before upsampling (linear maps commute): in training (batch
    statistics) the loss and every parameter's gradient equal SegFormer's concat-then-fuse."""
    torch.manual_seed(0)
    head = AllMLPHead(CHANNELS, num_classes=3, embed_dim=8, dropout=0.0).train()
    feats = features()
    target = torch.randint(0, 3, (2, 16, 16))
    grads = []
    for forward in (head, lambda f: concat_then_fuse(head, f)):
        loss = segmentation_loss(forward(feats), target)
        grads.append((loss.detach(), torch.autograd.grad(loss, list(head.parameters()))))
    (loss, got), (want_loss, want) = grads
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_segmentation_loss_is_cross_entropy_with_ignore_index():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    target = torch.randint(0, 4, (2, 5, 5), generator=g)
    target[0, :2] = 255
    torch.testing.assert_close(
        segmentation_loss(logits, target), F.cross_entropy(logits, target, ignore_index=255)
    )
    target = target.clamp_max(3)  # 0 is now the ignored class
    expected = F.cross_entropy(logits, target, ignore_index=0)
    torch.testing.assert_close(build_loss("segmentation", ignore_index=0)(logits, target), expected)
    with pytest.raises(ValueError, match="segmentation, sod, detection"):
        build_loss("depth")


def test_all_ignored_batch_gives_zero_and_a_finite_gradient():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 3, 3), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_sod_loss_by_hand():
    ln3 = math.log(3.0)
    logits = torch.tensor(
        [[[[0.0, ln3], [-ln3, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]
    )  # p: .5 .75 .25 .5 | all .5
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # (B, H, W) is accepted
    # image 1: BCE = -(ln .5 + ln .75 + ln .75 + ln .5)/4; I = .5 + .75 = 1.25, U = 2 + 2 - 1.25 = 2.75
    # image 2: BCE = ln 2; I = 0, U = 2, so the IoU term is 1
    bce = (-(2 * math.log(0.5) + 2 * math.log(0.75)) / 4 + math.log(2.0)) / 2
    iou = ((1 - 1.25 / 2.75) + 1.0) / 2
    assert soft_iou_loss(logits, target).item() == pytest.approx(iou, abs=1e-6)
    assert sod_loss(logits, target).item() == pytest.approx(bce + iou, abs=1e-6)
    assert build_loss("sod")(logits, target.unsqueeze(1)).item() == pytest.approx(bce + iou, abs=1e-6)


def test_perfect_saliency_has_near_zero_iou_term():
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:6, 2:6] = 1.0  # the second image has no salient object
    logits = 30.0 * (2 * target - 1)
    assert soft_iou_loss(logits, target).item() < 1e-5
    assert sod_loss(logits, target).item() < 1e-5
    assert soft_iou_loss(-logits, target).item() == pytest.approx(1.0, abs=1e-5)


PROGRESSIVE_CHANNELS = [8, 16, 32, 64]


def pyramid(batch: int = 2, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, size // 2**i, size // 2**i, generator=g) for i, c in enumerate(PROGRESSIVE_CHANNELS)
    ]


def test_progressive_head_predicts_one_channel_at_stride_4_or_the_requested_size():
    head = ProgressiveSODHead(PROGRESSIVE_CHANNELS, embed_dim=8)
    assert head(pyramid()).shape == (2, 1, 16, 16)
    assert head(pyramid(), out_size=(64, 48)).shape == (2, 1, 64, 48)
    assert head(pyramid(batch=1, size=24)).shape == (1, 1, 24, 24)  # 24 -> 12 -> 6 -> 3
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        head(pyramid()[:3])


def test_progressive_head_uses_every_scale():
    torch.manual_seed(0)
    head = ProgressiveSODHead(PROGRESSIVE_CHANNELS, embed_dim=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and shifts
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_()
    feats = pyramid()
    with torch.no_grad():
        logits = head(feats)
        for i in range(len(feats)):
            zeroed = [torch.zeros_like(f) if j == i else f for j, f in enumerate(feats)]
            assert not torch.allclose(head(zeroed), logits), f"scale {i} does not reach the output"


def test_progressive_head_gradients_reach_every_parameter():
    torch.manual_seed(0)
    head = ProgressiveSODHead(PROGRESSIVE_CHANNELS, embed_dim=8, dropout=0.0).train()
    feats = [f.requires_grad_() for f in pyramid()]
    logits = head(feats, out_size=(32, 32))
    (logits * torch.randn_like(logits)).sum().backward()  # random weights: no BN-cancelled constant
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_progressive_head_deep_supervision_returns_every_decoder_stage_in_training():
    """CPNet's deep supervision: a side logit from each coarser decoder stage (strides 32, 16, 8),
    all at the output size in training; eval returns the same final map as without side outputs."""
    torch.manual_seed(0)
    plain = ProgressiveSODHead(PROGRESSIVE_CHANNELS, embed_dim=8, dropout=0.0)
    deep = ProgressiveSODHead(PROGRESSIVE_CHANNELS, embed_dim=8, dropout=0.0, deep_supervision=True)
    assert len(deep.side) == 3 and len(plain.side) == 0
    assert sum(p.numel() for p in deep.parameters()) - sum(p.numel() for p in plain.parameters()) == 3 * (8 * 9 + 1)
    deep.load_state_dict(plain.state_dict(), strict=False)  # the shared layers equal
    feats = pyramid()
    with torch.no_grad():  # before any training forward moves the BatchNorm statistics apart
        torch.testing.assert_close(deep.eval()(feats), plain.eval()(feats))
    outputs = deep.train()(feats, out_size=(32, 32))
    assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [(2, 1, 32, 32)] * 4
    torch.testing.assert_close(outputs[0], plain.train()(feats, out_size=(32, 32)))
    # the coarsest side output is the stride-32 map's prediction, upsampled: 2x2 -> 32x32
    top = deep.top(deep.project[-1](feats[-1]))
    expected = F.interpolate(deep.side[0](top), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(outputs[1], expected)
    outputs = deep.train()(feats)
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deep.side.parameters())


def test_build_decoder_chooses_the_architecture_apart_from_the_task():
    cfg = {"embed_dim": 8, "dropout": 0.1}  # as from the YAML decoder block
    head = build_decoder("sod", PROGRESSIVE_CHANNELS, 1, architecture="progressive", **cfg)
    assert isinstance(head, ProgressiveSODHead) and head(pyramid()).shape == (2, 1, 16, 16)
    assert isinstance(build_decoder("sod", PROGRESSIVE_CHANNELS, 1, **cfg), SODHead)
    assert type(build_decoder("sod", PROGRESSIVE_CHANNELS, 1, architecture="all_mlp", **cfg)) is SODHead
    seg = build_decoder("segmentation", PROGRESSIVE_CHANNELS, 3, architecture="all_mlp", **cfg)
    assert type(seg) is AllMLPHead
    with pytest.raises(ValueError, match="'progressive' is not available for 'segmentation'.*all_mlp"):
        build_decoder("segmentation", PROGRESSIVE_CHANNELS, 3, architecture="progressive", **cfg)
    with pytest.raises(ValueError, match="all_mlp, progressive"):
        build_decoder("sod", PROGRESSIVE_CHANNELS, 1, architecture="unet")
    with pytest.raises(ValueError, match="one saliency channel"):
        build_decoder("sod", PROGRESSIVE_CHANNELS, 2, architecture="progressive")
