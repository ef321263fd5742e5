"""CoLA: the paper's parameter count, exact reduction to the frozen encoder and to LoRA, phi read
from the other stream only, c refreshed at the three points of every block (whole image, no
padding), and gradients on CoLA's own tensors only.

Random weights. sam2_hiera_tiny at 64 px has windowed, q-pooling, global and padded blocks;
vit_tiny_patch16_224 at 64 px is a 4x4 grid plus a class token.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.hieradet_sam2 import _calc_pad, window_unpartition
from torch import Tensor, nn

from pipeline.models.backbone import Backbone, create_backbone
from pipeline.models.cola import QKV, TARGETS, CoLA, CoLAAdapter

HIERA = "sam2_hiera_tiny"
VIT = "vit_tiny_patch16_224"
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[HIERA, VIT])
def backbone(request: pytest.FixtureRequest) -> Backbone:
    """Frozen, as stage 2 freezes it; layer scale on, so that the copied blocks apply it."""
    return (
        create_backbone(request.param, weights="random", img_size=SIZE, init_values=0.1)
        .eval()
        .requires_grad_(False)
    )


@pytest.fixture(scope="module")
def images() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {s: torch.randn(2, 3, SIZE, SIZE, generator=generator) for s in ("rgb", "thermal")}


def fill(cola: CoLA, name: str, seed: int = 1, std: float = 0.1) -> None:
    """Draw every adapter's `name` (e.g. "B", "B_c") from N(0, std), as training would move it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in cola.modules():
            if isinstance(module, CoLAAdapter):
                param = getattr(module, name)
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def adapters(cola: CoLA) -> dict[tuple[str, int, str], CoLAAdapter]:
    return {
        (stream, i, target): layer[target]
        for stream, blocks in cola.adapters.items()
        for i, layer in enumerate(blocks)
        for target in layer
    }


def record(cola: CoLA, pre: bool) -> tuple[dict[tuple[str, int, str], Tensor], list]:
    """Hooks on every hypernetwork: its input c (pre=True) or its output, phi before reshape."""
    seen: dict[tuple[str, int, str], Tensor] = {}
    hooks = []
    for key, adapter in adapters(cola).items():
        def hook(_module, args, output=None, key=key):
            seen[key] = (args[0] if pre else output).detach().clone()
        hyper = adapter.hyper
        hooks.append(hyper.register_forward_pre_hook(hook) if pre else hyper.register_forward_hook(hook))
    return seen, hooks


def remove(hooks: list) -> None:
    for hook in hooks:
        hook.remove()


def assert_equal_maps(a: dict[str, list[Tensor]], b: dict[str, list[Tensor]]) -> None:
    assert a.keys() == b.keys()
    for stream, maps in a.items():
        assert len(maps) == len(b[stream]) == 4
        for x, y in zip(maps, b[stream], strict=True):
            assert torch.equal(x, y), stream


def differs(a: list[Tensor], b: list[Tensor]) -> bool:
    return all((x - y).abs().max() > 1e-5 for x, y in zip(a, b, strict=True))


def test_parameter_count_over_lora_is_the_papers_12_5m():
    backbone = create_backbone("vit_base_patch16_224", weights="random")
    cola, lora = CoLA(backbone, rank=16), CoLA(backbone, rank=16, cross=False)
    # ViT-B/16: width C = 768, MLP 3072, 12 blocks, two streams; q, k, v, o, fc1, fc2 adapted.
    r, c, hidden, blocks = 16, 768, 3072, 12
    lora_block = 4 * r * (c + c) + 2 * r * (c + hidden)  # A (r x in) + B (out x r) per layer
    k = c // 16  # reduction 16 (Table 7)
    hyper = (c * k + k) + 2 * k + (k * r * r + r * r) + 2 * r * r  # Linear, LayerNorm, Linear, LayerNorm
    cross_block = lora_block + 6 * (hyper + 1)  # A_c, B_c sized as A, B; hypernetwork; s
    assert lora.num_parameters == 2 * blocks * lora_block == 5_308_416
    extra = cola.num_parameters - lora.num_parameters
    assert extra == 2 * blocks * cross_block == 12_517_776
    assert abs(extra - 12.5e6) <= 0.3e6


@torch.no_grad()
def test_at_init_both_streams_equal_the_frozen_backbone(backbone, images):
    expected = {s: backbone(x) for s, x in images.items()}
    assert differs(expected["rgb"], expected["thermal"])
    for cross in (True, False):
        cola = CoLA(backbone, cross=cross)
        assert all(not a.B.any() for a in adapters(cola).values())
        assert_equal_maps(cola(backbone, images), expected)
    scales = {a.s.item() for a in adapters(CoLA(backbone, rank=8, alpha=4.0, s_init=0.25)).values()}
    assert scales == {0.25}  # s starts at s_init, apart from alpha / r


@torch.no_grad()
def test_with_zero_cross_path_it_is_exactly_lora(backbone, images):
    torch.manual_seed(0)
    cola = CoLA(backbone)
    fill(cola, "B")
    lora = CoLA(backbone, cross=False)
    lora_keys = lora.state_dict().keys()
    assert lora_keys < cola.state_dict().keys()
    lora.load_state_dict({k: v for k, v in cola.state_dict().items() if k in lora_keys})

    as_lora = lora(backbone, images)
    assert_equal_maps(cola(backbone, images), as_lora)
    frozen = {s: backbone(x) for s, x in images.items()}
    assert all(differs(as_lora[s], frozen[s]) for s in images)  # the LoRA path is live

    fill(cola, "B_c", seed=2)
    crossed = cola(backbone, images)
    assert all(differs(crossed[s], as_lora[s]) for s in images)  # and so is the cross path


@torch.no_grad()
def test_a_subset_of_targets_adapts_only_those_layers(backbone, images):
    torch.manual_seed(0)
    full = CoLA(backbone)
    fill(full, "B")
    fill(full, "B_c", seed=2)
    partial = CoLA(backbone, targets=("v", "q", "fc2"))
    assert partial.targets == ("q", "v", "fc2")
    state = full.state_dict()
    partial.load_state_dict({k: state[k] for k in partial.state_dict()})
    for (_, _, target), adapter in adapters(full).items():  # the same model: other layers at zero
        if target not in partial.targets:
            adapter.B.zero_()
            adapter.B_c.zero_()
    assert_equal_maps(partial(backbone, images), full(backbone, images))
    with pytest.raises(ValueError, match="subset"):
        CoLA(backbone, targets=("qkv",))


@torch.no_grad()
def test_phi_is_per_sample_and_read_from_the_other_stream_only(backbone, images):
    torch.manual_seed(0)
    cola = CoLA(backbone)
    fill(cola, "B")  # adapted streams, still independent while B_c = 0

    def phis(inputs: dict[str, Tensor]) -> dict[tuple[str, int, str], Tensor]:
        seen, hooks = record(cola, pre=False)
        try:
            cola(backbone, inputs)
        finally:
            remove(hooks)
        return seen

    base = phis(images)
    assert len(base) == 2 * len(backbone.model.blocks) * len(TARGETS)
    for changed, other in (("thermal", "rgb"), ("rgb", "thermal")):
        edited = images[changed].clone()
        edited[1] = torch.randn(edited[1].shape, generator=torch.Generator().manual_seed(5))
        after = phis({**images, changed: edited})
        for (stream, i, target), phi in base.items():
            if stream == changed:  # its own input changed, its phi did not
                assert torch.equal(after[stream, i, target], phi), (stream, i, target)
            else:  # the other stream's input changed: its phi changed, for that sample only
                assert torch.equal(after[stream, i, target][0], phi[0]), (stream, i, target)
                assert (after[stream, i, target][1] - phi[1]).abs().max() > 1e-4, (stream, i, target)

    # With B_c != 0 the streams are coupled through phi: the aux input moves the rgb features.
    thermal = images["thermal"].flip(-1)
    before = cola(backbone, images)["rgb"]
    assert_equal_maps({"rgb": cola(backbone, {**images, "thermal": thermal})["rgb"]}, {"rgb": before})
    fill(cola, "B_c", seed=2)
    assert differs(cola(backbone, {**images, "thermal": thermal})["rgb"], cola(backbone, images)["rgb"])


def image_mean_of_proj_input(block: nn.Module, proj_input: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """The mean over an image's real tokens of a Hiera attention output given as (padded)
    windows, written from timm's block: windows are q-stride times smaller after q-pooling."""
    if not block.is_windowed:
        return proj_input.mean(dim=(1, 2))
    stride = block.q_stride or (1, 1)
    window = (block.window_size[0] // stride[0], block.window_size[1] // stride[1])
    padded_h, padded_w, _, _ = _calc_pad(*out_hw, window)
    image = window_unpartition(proj_input, window, (padded_h, padded_w))
    return image[:, : out_hw[0], : out_hw[1]].mean(dim=(1, 2))


@torch.no_grad()
def test_cross_features_are_refreshed_at_three_points_of_every_block(backbone, images):
    """c of each adapted layer == the other stream's residual stream entering norm1 (q, k, v),
    proj input (o) and residual stream entering norm2 (fc1, fc2), as the released code takes
    them, pooled over its whole image; taken from plain runs of the encoder (at init both
    streams' features are the frozen encoder's)."""
    hiera = backbone.name == HIERA
    blocks = backbone.model.blocks

    def points(x: Tensor) -> list[dict[str, Tensor]]:
        found: list[dict[str, Tensor]] = [{} for _ in blocks]
        hooks = []
        for i, block in enumerate(blocks):
            def keep(name: str, i: int = i):
                return lambda _m, args, out=None: found[i].update({name: args[0] if out is None else out})
            hooks += [
                block.norm1.register_forward_pre_hook(keep("norm1_in")),
                block.attn.proj.register_forward_pre_hook(keep("proj_in")),
                block.norm2.register_forward_pre_hook(keep("norm2_in")),
                block.register_forward_hook(keep("out")),
            ]
        try:
            backbone(x)
        finally:
            remove(hooks)
        return found

    cola = CoLA(backbone)
    seen, hooks = record(cola, pre=True)
    try:
        cola(backbone, images)
    finally:
        remove(hooks)

    padding_seen = False
    for stream, other in (("rgb", "thermal"), ("thermal", "rgb")):
        for i, (block, at) in enumerate(zip(blocks, points(images[other]), strict=True)):
            tokens = (1, 2) if hiera else (1,)
            if hiera:
                o_point = image_mean_of_proj_input(block, at["proj_in"], at["out"].shape[1:3])
                with_padding = at["proj_in"].reshape(2, -1, at["proj_in"].shape[-1]).mean(dim=1)
                padding_seen |= not torch.allclose(o_point, with_padding, atol=1e-4)
            else:
                o_point = at["proj_in"].mean(dim=1)
            expected = {
                **dict.fromkeys(QKV, at["norm1_in"].mean(dim=tokens)),
                "o": o_point,
                **dict.fromkeys(("fc1", "fc2"), at["norm2_in"].mean(dim=tokens)),
            }
            for target, c in expected.items():
                assert c.shape == (2, cola.adapters[stream][i][target].hyper[0].in_features)
                torch.testing.assert_close(seen[stream, i, target], c, rtol=1e-5, atol=1e-6)
    assert padding_seen == hiera  # some Hiera windows are padded, and the padding is left out


@torch.no_grad()
def test_class_token_pooling_reads_the_other_streams_class_token(images):
    """`pool: cls` (the paper: "averaging along the token dimension or utilizing the [CLS] token")."""
    vit = create_backbone(VIT, weights="random", img_size=SIZE).eval().requires_grad_(False)
    entering: list[Tensor] = []
    hook = vit.model.blocks[0].norm1.register_forward_pre_hook(lambda _m, args: entering.append(args[0]))
    vit(images["thermal"])
    hook.remove()
    cola = CoLA(vit, pool="cls")
    seen, hooks = record(cola, pre=True)
    cola(vit, images)
    remove(hooks)
    torch.testing.assert_close(seen["rgb", 0, "q"], entering[0][:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class token"):
        CoLA(create_backbone(HIERA, weights="random", img_size=SIZE), pool="cls")


def test_scales_and_hypernetworks_are_the_papers():
    """Tables 7-9: alpha 8 at rank 16 (alpha/r = 0.5), s initialised on its own (s_init), and the
    hypernetwork's reduction per stage of a hierarchical encoder ([2, 4, 8, 16]); the
    hypernetwork as released: Linear, GELU, LayerNorm, Linear, LayerNorm."""
    hiera = create_backbone(HIERA, weights="random", img_size=SIZE)
    for s_init in (0.1, 0.5):
        cola = CoLA(hiera, s_init=s_init, reduction=[2, 4, 8, 16])
        for adapter in adapters(cola).values():
            assert adapter.scaling == 0.5 and adapter.s.item() == pytest.approx(s_init)
            kinds = [type(m).__name__ for m in adapter.hyper]
            assert kinds == ["Linear", "GELU", "LayerNorm", "Linear", "LayerNorm"]
    stage = [sum(i > end for end in hiera.model.stage_ends) for i in range(len(hiera.model.blocks))]
    for (_, block, _), adapter in adapters(cola).items():  # a block's stage is the one it outputs
        assert adapter.hyper[0].out_features == adapter.hyper[0].in_features // [2, 4, 8, 16][stage[block]]
    with pytest.raises(ValueError, match="one per stage"):
        CoLA(hiera, reduction=[2, 4])


def test_gradients_reach_every_adapter_tensor_and_nothing_else(backbone, images):
    torch.manual_seed(0)
    cola = CoLA(backbone)
    fill(cola, "B")
    fill(cola, "B_c", seed=2)
    maps = cola(backbone, images)
    sum((m.square().mean() for stream in maps.values() for m in stream), torch.zeros(())).backward()

    for name, param in cola.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
    assert {n.rsplit(".", 1)[-1] for n, _ in cola.named_parameters()} >= {"A", "B", "A_c", "B_c", "s"}
    assert any(".hyper." in n for n, _ in cola.named_parameters())
    assert all(p.grad is None for p in backbone.parameters())

    state = cola.state_dict()
    assert all(k.startswith(("adapters.rgb.", "adapters.thermal.")) for k in state)
    assert sum(t.numel() for t in state.values()) == cola.num_parameters
    backbone_storage = {p.data_ptr() for p in backbone.state_dict().values()}
    assert not backbone_storage & {t.data_ptr() for t in state.values()}
    assert not any(isinstance(m, Backbone) for m in cola.modules())


def test_refuses_bad_streams_inputs_and_another_encoder(backbone, images):
    cola = CoLA(backbone)
    with pytest.raises(KeyError, match="thermal"):
        cola(backbone, {"rgb": images["rgb"], "depth": images["thermal"]})
    with pytest.raises(ValueError, match="batch sizes"):
        cola(backbone, {**images, "thermal": images["thermal"][:1]})
    with pytest.raises(ValueError, match="two distinct streams"):
        CoLA(backbone, streams=("rgb", "rgb"))
    if backbone.name == HIERA:  # one other encoder is enough
        vit = create_backbone(VIT, weights="random", img_size=SIZE)
        with pytest.raises(ValueError, match="do not match"):
            cola(vit, images)
