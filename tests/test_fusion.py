"""TP-MoME and the simple per-scale fusions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models.fusion import ConcatFusion, MeanFusion, MultiScaleFusion, TPMoME

STREAMS = ("rgb", "thermal", "depth")
C = 8


def features(batch: int = 3, size: int = 8, streams=STREAMS, seed: int = 0, grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(batch, C, size, size, generator=g).requires_grad_(grad) for s in streams}


def tp_mome(gating: str = "anchor", **kwargs) -> TPMoME:
    """A TP-MoME whose zero-initialised layers are randomised, so every expert and the gate act."""
    torch.manual_seed(0)
    module = TPMoME(STREAMS, C, proj_dim=4, hidden_dim=8, gating=gating, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(std=0.5)
    return module


def expert_outputs(module: TPMoME, feats: dict, present: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The experts run one by one, as the equations read: E_0(R_cat), E_m(R_cat * mask_m) (the
    reference that the module's fused `mixture` must equal)."""
    active = module.presence(present, feats[STREAMS[0]])
    r_cat = module.concat([feats[s] for s in STREAMS], active)
    return [module.experts[0](r_cat)] + [expert(module.only(r_cat, m)) for m, expert in enumerate(module.experts[1:])]


@pytest.mark.parametrize("gating", ["anchor", "softmax", "mean", "residual"])
def test_shapes_and_gate_names(gating):
    module = TPMoME(STREAMS, C, out_channels=5, proj_dim=4, hidden_dim=8, gating=gating)
    out = module(features())
    assert out.shape == (3, 5, 8, 8)
    names = STREAMS if gating == "anchor" else ("general", *STREAMS)
    assert module.gate_names == names and module.last_gates.shape == (3, len(names))
    assert TPMoME(["rgb"], C)(features(streams=["rgb"])).shape == (3, C, 8, 8)  # defaults, M = 1


def test_modality_experts_see_only_their_modality():
    module = tp_mome("softmax").eval()
    base = expert_outputs(module, features())
    for j, stream in enumerate(STREAMS):
        perturbed = features()
        perturbed[stream] = perturbed[stream] + torch.randn_like(perturbed[stream])
        outs = expert_outputs(module, perturbed)
        assert not torch.allclose(outs[0], base[0])  # the general expert sees all
        for m in range(len(STREAMS)):
            assert torch.equal(outs[1 + m], base[1 + m]) != (m == j)


def test_expert_gradients_reach_only_their_stream():
    module = tp_mome("anchor").eval()
    feats = features(grad=True)
    r_cat = module.concat([feats[s] for s in STREAMS], torch.ones(3, 3, dtype=torch.bool))
    inputs = [feats[s] for s in STREAMS]
    general = torch.autograd.grad(module.experts[0](r_cat).sum(), inputs, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in general)
    for m in range(len(STREAMS)):
        grads = torch.autograd.grad(
            module.experts[1 + m](module.only(r_cat, m)).sum(), inputs, retain_graph=True
        )
        for j, g in enumerate(grads):
            assert (g.abs().sum() > 0) if j == m else torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("gating", ["anchor", "softmax", "mean", "residual"])
def test_output_is_the_documented_combination_of_experts(gating):
    """The fused forward (three convolutions for all experts) equals the experts run one by one
    and mixed as the module docstring writes it, for samples with a stream missing too."""
    module = tp_mome(gating).eval()
    feats = features()
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    outs = expert_outputs(module, feats, present)
    out, beta = module(feats, present), module.last_gates
    weighted = [
        beta[:, k, None, None, None] * o for k, o in enumerate(outs[1:] if gating == "anchor" else outs)
    ]
    expected = outs[0] + sum(weighted) if gating == "anchor" else sum(weighted)
    if gating == "residual":  # the anchor: one 1x1 conv over the concatenated present streams
        expected = expected + module.anchor.mix(torch.cat(
            [feats[s] * present[:, m, None, None, None] for m, s in enumerate(STREAMS)], dim=1))
    torch.testing.assert_close(out, expected)
    if gating == "mean":
        assert torch.equal(beta, torch.tensor([[0.25] * 4, [1 / 3, 1 / 3, 0, 1 / 3], [0.5, 0, 0, 0.5]]))
    else:  # a real gate: per-sample weights that differ between samples
        assert not torch.allclose(beta[0], beta[1])


def test_gates_are_distributions_over_present_experts():
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    for gating in ("anchor", "softmax", "mean", "residual"):
        module = tp_mome(gating).eval()
        module(features(), present)
        beta = module.last_gates
        assert (beta >= 0).all()
        torch.testing.assert_close(beta.sum(dim=1), torch.ones(3))
        modality = beta if gating == "anchor" else beta[:, 1:]
        assert torch.equal(modality == 0, ~present)
        if gating != "anchor":
            assert (beta[:, 0] > 0).all()  # the general expert is always on


def test_absent_streams_do_not_affect_their_samples():
    module = tp_mome().eval()
    present = torch.tensor([[True, False, True], [True, True, True], [True, True, True]])
    feats = features()
    changed = dict(feats, thermal=feats["thermal"] + 10.0)
    out, out_changed = module(feats, present), module(changed, present)
    assert torch.equal(out[0], out_changed[0]) and not torch.allclose(out[1], out_changed[1])
    with pytest.raises(ValueError, match="at least one"):
        module(feats, torch.tensor([[False] * 3, [True] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="shape"):
        module(feats, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(KeyError, match="depth"):
        module({"rgb": feats["rgb"], "thermal": feats["thermal"]})


def test_modality_dropout_is_drawn_once_per_sample_for_every_scale():
    """A stream dropped for a sample is dropped at all four scales (TP-MoME and mean fusions
    alike): its features get no gradient anywhere, and a kept stream is never revived."""
    torch.manual_seed(0)
    channels = [8, 8, 8, 8]
    module = MultiScaleFusion(STREAMS, channels, kind="tp_mome", stages=(0, 1, 2), modality_dropout=0.9).train()
    present = torch.ones(64, 3, dtype=torch.bool)
    present[:32, 0] = False
    feats = {s: [torch.randn(64, c, 4 >> min(i, 1), 4 >> min(i, 1), requires_grad=True) for i, c in enumerate(channels)]
             for s in STREAMS}
    out = module(feats, present)
    active = module.last_active
    assert active.any(dim=1).all() and (active.sum(dim=1) < 3).any()
    assert not (active & ~present).any()  # dropout never revives an absent stream
    rescued = active.sum(dim=1) == 1
    assert set(active[rescued].float().argmax(dim=1).tolist()) == {0, 1, 2}  # the kept stream is random
    for scale in module.scales[:3]:
        assert torch.equal(scale.last_active, active)  # one mask for every TP-MoME scale
        assert torch.equal(scale.last_gates[:, 1:] == 0, ~active)
        torch.testing.assert_close(scale.last_gates.sum(dim=1), torch.ones(64))
    grads = torch.autograd.grad(sum(o.sum() for o in out), [x for s in STREAMS for x in feats[s]])
    for index, g in enumerate(grads):  # at every scale, the mean fusion's included
        m = index // len(channels)
        assert torch.equal(g[~active[:, m]], torch.zeros_like(g[~active[:, m]])), (STREAMS[m], index % 4)

    module.eval()
    module(feats)
    assert module.last_active.all()


def test_mean_gating_has_no_gate_and_bad_options_fail():
    module = TPMoME(STREAMS, C, gating="mean")
    assert module.gate is None and not any("gate" in name for name, _ in module.named_parameters())
    with pytest.raises(ValueError, match="anchor, softmax, mean, residual"):
        TPMoME(STREAMS, C, gating="top1")
    with pytest.raises(ValueError, match="modality_dropout"):
        MultiScaleFusion(STREAMS, [C], modality_dropout=1.0)


def test_residual_starts_as_the_concat_fusion_and_drops_absent_streams_from_the_anchor():
    module = TPMoME(STREAMS, C).eval()  # the default reading
    assert module.gating == "residual"
    concat = ConcatFusion(STREAMS, C)
    concat.load_state_dict(module.anchor.state_dict())
    present = torch.tensor([[True, False, True], [True, True, True], [True, True, False]])
    feats = features()
    torch.testing.assert_close(module(feats, present), concat(feats, present))  # experts start at zero
    active = torch.cat([torch.ones(3, 1, dtype=torch.bool), present], dim=1)  # general expert + streams
    torch.testing.assert_close(module.last_gates, active.float() / active.sum(dim=1, keepdim=True))


def test_anchor_starts_as_the_general_expert_with_uniform_gates():
    module = TPMoME(STREAMS, C, gating="anchor").eval()
    feats = features()
    out = module(feats)
    torch.testing.assert_close(out, expert_outputs(module, feats)[0])
    torch.testing.assert_close(module.last_gates, torch.full((3, 3), 1 / 3))


def test_simple_fusions():
    feats = features()
    mean = MeanFusion(STREAMS)
    torch.testing.assert_close(mean(feats), (feats["rgb"] + feats["thermal"] + feats["depth"]) / 3)
    present = torch.tensor([[True, False, False], [True, True, True], [False, True, True]])
    torch.testing.assert_close(mean(feats, present)[0], feats["rgb"][0])
    concat = ConcatFusion(STREAMS, C, out_channels=4)
    assert concat(feats).shape == (3, 4, 8, 8)
    x = torch.cat([feats[s] for s in STREAMS], dim=1)
    torch.testing.assert_close(concat(feats), nn.functional.conv2d(x, concat.mix.weight, concat.mix.bias))


def test_multi_scale_fusion_kinds_and_stages():
    channels = [4, 6, 8, 10]
    feats = {s: [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(channels)] for s in STREAMS}
    fusion = MultiScaleFusion(STREAMS, channels, stages=(1, 3), gating="softmax", proj_dim=2, hidden_dim=4)
    out = fusion(feats)
    assert [o.shape for o in out] == [f.shape for f in feats["rgb"]]
    assert [type(f) for f in fusion.scales] == [MeanFusion, TPMoME, MeanFusion, TPMoME]
    torch.testing.assert_close(out[0], sum(feats[s][0] for s in STREAMS) / 3)
    assert sorted(fusion.last_gates) == [1, 3] and fusion.last_gates[1].shape == (2, 4)

    single = {"rgb": feats["rgb"]}
    for kind in ("tp_mome", "concat", "mean"):
        outs = MultiScaleFusion(["rgb"], channels, kind=kind)(single)
        assert [o.shape for o in outs] == [f.shape for f in single["rgb"]]
    assert all(isinstance(f, ConcatFusion) for f in MultiScaleFusion(STREAMS, channels, kind="concat").scales)
    assert sum(p.numel() for p in MultiScaleFusion(STREAMS, channels, kind="mean").parameters()) == 0

    with pytest.raises(ValueError, match="tp_mome, concat, mean"):
        MultiScaleFusion(STREAMS, channels, kind="sum")
    with pytest.raises(ValueError, match="only apply"):
        MultiScaleFusion(STREAMS, channels, kind="concat", gating="softmax")
    with pytest.raises(ValueError, match="stages"):
        MultiScaleFusion(STREAMS, channels, stages=(4,))
    with pytest.raises(ValueError, match="maps"):
        fusion({s: f[:3] for s, f in feats.items()})
