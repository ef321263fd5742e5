"""Backbone factory: four-scale outputs, checkpoint layouts, provenance.

No pretrained weights can be downloaded here, so every checkpoint is written by the test from
a randomly initialised model. Tiny variants, small inputs, and one shared model per family
keep the file fast on a CPU.
"""

from __future__ import annotations

import copy
import logging
import pathlib

import pytest
import safetensors.torch
import timm
import timm.models._builder
import torch
import torch.nn.functional as F

from pipeline.models.backbone import (
    compute_fingerprint,
    convert_sam2_checkpoint,
    create_backbone,
    load_state_dict_file,
)

HIERA = "sam2_hiera_tiny"
SWIN = "swin_tiny_patch4_window7_224"
VIT = "vit_tiny_patch16_224"
EVA = "eva02_tiny_patch14_224"
TRUNK = "image_encoder.trunk."


def to_sam2_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm HieraDet state dict written the way Meta's SAM 2 checkpoints store the trunk,
    plus a few parts of SAM 2 that are not the trunk."""
    meta = {
        TRUNK + k.replace(".mlp.fc1.", ".mlp.layers.0.").replace(".mlp.fc2.", ".mlp.layers.1."): v
        for k, v in timm_state.items()
    }
    meta["image_encoder.neck.convs.0.conv.weight"] = torch.randn(4, 4, 1, 1)
    meta["sam_mask_decoder.foo"] = torch.randn(3)
    meta["memory_attention.layers.0.self_attn.q_proj.weight"] = torch.randn(2, 2)
    meta["no_mem_embed"] = torch.randn(1, 1, 4)
    return meta


def features(backbone, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return backbone.eval()(x)


@pytest.fixture(scope="module")
def hiera():
    """The Hiera weights every checkpoint test writes out (seed 1; loaders use other seeds)."""
    return create_backbone(HIERA, weights="random", seed=1)


@pytest.fixture(scope="module")
def swin():
    return create_backbone(SWIN, weights="random", img_size=64)


@pytest.fixture(scope="module")
def vit():
    return create_backbone(VIT, weights="random")


@pytest.fixture(scope="module")
def eva():
    return create_backbone(EVA, weights="random")


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))


# 1. Meta's SAM 2 layout --------------------------------------------------------------------


def test_sam2_checkpoint_loads_into_differently_seeded_model(hiera, x, tmp_path):
    meta = to_sam2_layout(hiera.model.state_dict())
    assert any(".mlp.layers.0." in k for k in meta), "the file must use SAM 2's MLP names"
    path = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": meta}, path)

    # Seed 2 gives other random weights: equal features below mean the file was loaded.
    loaded = create_backbone(HIERA, weights="checkpoint", checkpoint=path, seed=2)

    for got, want in zip(features(loaded, x), features(hiera, x), strict=True):
        assert torch.equal(got, want)
    assert loaded.weights_fingerprint == hiera.weights_fingerprint
    assert loaded.weights_source == f"checkpoint:{path} (sam2)"
    assert loaded.is_random_init is False and loaded.weights == "checkpoint"
    # test_full_timm_state_dict_loads[hiera-safetensors] loads the same weights from a
    # timm-layout .safetensors and checks for the same fingerprint.


def test_convert_sam2_checkpoint_uses_timm_names(hiera):
    converted = convert_sam2_checkpoint({"model": to_sam2_layout(hiera.model.state_dict())})
    assert converted.keys() == hiera.model.state_dict().keys()


def test_torch_checkpoint_is_opened_weights_only(tmp_path):
    marker = tmp_path / "pickled-code-ran"

    class Payload:  # unpickling it would create `marker`
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"model": {TRUNK + "pos_embed": torch.zeros(1), "payload": Payload()}}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match="refused"):
        create_backbone(HIERA, weights="checkpoint", checkpoint=path)
    assert not marker.exists()


# 2. timm layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "save"),
    [("hiera", "safetensors"), ("swin", "torch"), ("vit", "torch-under-state_dict")],
)
def test_full_timm_state_dict_loads(family, save, request, tmp_path):
    """A timm model's full state dict (classifier and final norm included) loads."""
    source = request.getfixturevalue(family)
    size = {} if family == "hiera" else {"img_size": source.img_size}
    with torch.device("meta"):  # names and shapes of what the backbone pruned
        full = timm.create_model(source.name, **size)
    state = dict(source.model.state_dict())
    pruned = {k: torch.randn(v.shape) for k, v in full.state_dict().items() if k not in state}
    assert any(k.startswith("head.") for k in pruned)
    state.update(pruned)
    if save == "safetensors":
        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file(state, path)
    else:
        path = tmp_path / "w.pth"
        wrapped = {"state_dict": state, "epoch": 3} if save.endswith("state_dict") else state
        torch.save(wrapped, path)

    loaded = create_backbone(
        source.name, weights="checkpoint", checkpoint=path, img_size=source.img_size, seed=7
    )
    assert loaded.weights_fingerprint == source.weights_fingerprint
    assert loaded.weights_source == f"checkpoint:{path} (timm)"
    x = torch.randn(1, 3, 64, 64)
    for got, want in zip(features(loaded, x), features(source, x), strict=True):
        assert torch.equal(got, want)


def test_narrow_architecture_and_checkpoint_description_are_recorded(tmp_path):
    """A safetensors checkpoint may say what it is (the demo foundation model does); the timm
    arguments that shape the model are recorded, and rebuild it for plain timm/peft users."""
    narrow = create_backbone(HIERA, weights="random", embed_dim=48, seed=3)
    assert narrow.channels == [48, 96, 192, 384] and narrow.model_args == {"embed_dim": 48}
    path = tmp_path / "foundation.safetensors"
    safetensors.torch.save_file(narrow.model.state_dict(), path, metadata={"description": "demo foundation model"})
    loaded = create_backbone(HIERA, weights="checkpoint", checkpoint=path, embed_dim=48)
    assert loaded.weights_fingerprint == narrow.weights_fingerprint
    assert (loaded.weights_description, loaded.is_random_init) == ("demo foundation model", False)
    rebuilt = timm.create_model(HIERA, pretrained=False, num_classes=0, **loaded.provenance["model_args"])
    missing, unexpected = rebuilt.load_state_dict(loaded.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    with pytest.raises(ValueError, match="shape mismatches"):  # the file of the narrow model, the default width
        create_backbone(HIERA, weights="checkpoint", checkpoint=path)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(narrow.model.state_dict(), plain)
    described = create_backbone(HIERA, weights="checkpoint", checkpoint=plain, embed_dim=48).weights_description
    assert described == "checkpoint plain.safetensors"


# 3. four scales ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "hw", "channels"),
    [
        ("hiera", (64, 96), [96, 192, 384, 768]),
        ("vit", (96, 128), [192] * 4),
        ("swin", (64, 64), [96, 192, 384, 768]),
        ("eva", (448, 224), [192] * 4),
    ],
)
def test_four_scales_at_non_default_size(family, hw, channels, request):
    backbone = request.getfixturevalue(family)
    assert backbone.channels == channels
    assert backbone.reductions == [4, 8, 16, 32]
    maps = features(backbone, torch.randn(2, 3, *hw))
    expected = [(2, c, hw[0] // s, hw[1] // s) for c, s in zip(channels, [4, 8, 16, 32])]
    assert [tuple(m.shape) for m in maps] == expected


def test_vit_pyramid_is_parameter_free_resizing_of_spaced_blocks(vit):
    assert vit.block_indices == [2, 5, 8, 11]
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        grids = vit.model.forward_intermediates(x, indices=[2, 5, 8, 11], intermediates_only=True)
    maps = features(vit, x)
    torch.testing.assert_close(maps[0], F.interpolate(grids[0], scale_factor=4, mode="bilinear"))
    torch.testing.assert_close(maps[1], F.interpolate(grids[1], scale_factor=2, mode="bilinear"))
    torch.testing.assert_close(maps[2], grids[2])
    torch.testing.assert_close(maps[3], F.max_pool2d(grids[3], 2))


def test_eva_blocks_run_by_the_backbone_equal_timms_forward_intermediates():
    """The backbone runs the ViT / EVA blocks itself (activation checkpointing goes through its
    `run_block`); with EVA's rotary embedding its taken blocks are timm's, bit for bit."""
    eva = create_backbone("eva02_tiny_patch14_224", weights="random", img_size=224).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        grids = eva.model.forward_intermediates(x, indices=eva.block_indices, intermediates_only=True)
        maps = eva(x)
    assert eva.block_indices == [2, 5, 8, 11]
    expected = [eva._resize(g, s, (224 // s, 224 // s)) for g, s in zip(grids, (4, 8, 16, 32), strict=True)]
    assert [torch.equal(a, b) for a, b in zip(maps, expected, strict=True)] == [True] * 4


def test_vit_out_blocks_pick_the_pyramid_blocks():
    """IV-tuning's released EVA02-L takes blocks 7, 11, 15, 23 (0-based) of 24; a 12-block
    model here takes 1, 3, 5, 11, and the maps are those blocks' outputs."""
    vit = create_backbone(VIT, weights="random", img_size=64, out_blocks=[1, 3, 5, 11]).eval()
    assert vit.block_indices == [1, 3, 5, 11]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        grids = vit.model.forward_intermediates(x, indices=[1, 3, 5, 11], intermediates_only=True)
        maps = vit(x)
    torch.testing.assert_close(maps[2], grids[2])
    torch.testing.assert_close(maps[3], F.max_pool2d(grids[3], 2))
    for bad in ([1, 3, 5], [3, 1, 5, 11], [1, 3, 5, 12]):
        with pytest.raises(ValueError, match="out_blocks=.*increasing 0-based block indices below its depth 12"):
            create_backbone(VIT, weights="random", img_size=64, out_blocks=bad)
    with pytest.raises(ValueError, match="out_blocks=.*for ViT/EVA backbones"):
        create_backbone(SWIN, weights="random", img_size=64, out_blocks=[0, 1, 2, 3])


@pytest.mark.parametrize(
    ("family", "hw", "message"),
    [
        ("hiera", (64, 80), "multiples of 32"),
        ("vit", (96, 112), "multiples of 32"),
        ("eva", (224, 256), "multiples of 224"),
        ("swin", (96, 96), "img_size=96"),
    ],
)
def test_unsupported_input_size_is_refused(family, hw, message, request):
    with pytest.raises(ValueError, match=message):
        request.getfixturevalue(family)(torch.randn(1, 3, *hw))


@pytest.mark.parametrize(("name", "img_size"), [(SWIN, 100), (EVA, 256), (HIERA, 1000)])
def test_unsupported_img_size_is_refused_at_creation(name, img_size):
    with pytest.raises(ValueError, match=f"img_size {img_size} is not supported"):
        create_backbone(name, weights="random", img_size=img_size)


def test_swin_built_for_a_non_square_size():
    """MFNet-like H != W: Swin accepts [H, W] (as YAML gives it) and refuses the transpose."""
    swin = create_backbone(SWIN, weights="random", img_size=[64, 96])
    with torch.no_grad():
        maps = swin(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(64 // r, 96 // r) for r in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match=r"img_size=\[96, 64\]"):
        swin(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match=r"img_size \(64, 100\) is not supported.*\[64, 96\]"):
        create_backbone(SWIN, weights="random", img_size=[64, 100])


# 4. provenance -----------------------------------------------------------------------------


def test_fingerprint_changes_with_one_weight(hiera):
    assert len(hiera.weights_fingerprint) == 64
    assert compute_fingerprint(hiera.model) == hiera.weights_fingerprint
    changed = copy.deepcopy(hiera)
    with torch.no_grad():
        changed.model.blocks[5].attn.qkv.weight[3, 7] += 1e-3
    assert compute_fingerprint(changed.model) != hiera.weights_fingerprint


def test_random_init_is_seeded_recorded_and_warned(hiera, caplog):
    torch.manual_seed(123)  # the global RNG state must neither matter nor change
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="pipeline.models.backbone"):
        again = create_backbone(HIERA, weights="random", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert again.weights_fingerprint == hiera.weights_fingerprint  # same seed, same weights
    assert again.provenance == {
        "backbone": HIERA,
        "model_args": {},
        "weights": "random",
        "weights_source": "random-init(seed=1)",
        "weights_description": "random initialisation",
        "weights_fingerprint": hiera.weights_fingerprint,
        "is_random_init": True,
    }
    assert "RANDOM weights (seed=1)" in caplog.text


def test_pretrained_without_network_says_what_to_do(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise OSError("network is unreachable")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="network is unreachable") as err:
        create_backbone(HIERA, weights="pretrained")
    assert calls, "the hub download must have been attempted"
    assert "weights='checkpoint'" in str(err.value) and "network access" in str(err.value)


def test_pretrained_weights_are_timms_hub_download(hiera, monkeypatch):
    served = dict(hiera.model.state_dict())
    served.update({"head.norm.weight": torch.ones(768), "head.norm.bias": torch.zeros(768)})
    requested = []

    def hub(hub_id, *args, **kwargs):
        requested.append(hub_id)
        return served

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", hub)
    backbone = create_backbone(HIERA, weights="pretrained", seed=9)
    assert requested == ["timm/sam2_hiera_tiny.fb_r896"]
    assert backbone.weights_source == "timm:timm/sam2_hiera_tiny.fb_r896"
    assert backbone.is_random_init is False
    assert backbone.weights_fingerprint == hiera.weights_fingerprint


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": "imagenet"},
        {"weights": "checkpoint"},
        {"weights": "random", "checkpoint": "x.pt"},
        {"weights": "random", "pretrained": True},
    ],
)
def test_weights_config_must_be_unambiguous(kwargs):
    with pytest.raises(ValueError, match="weights"):
        create_backbone(HIERA, **kwargs)


def test_weights_are_a_required_choice():
    with pytest.raises(TypeError, match="weights"):
        create_backbone(HIERA)


# 5. checkpoints that do not fit -------------------------------------------------------------


def test_missing_trunk_keys_are_named_with_the_file(hiera, tmp_path):
    state = hiera.model.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    path = tmp_path / "partial.pt"
    torch.save({"model": to_sam2_layout(kept)}, path)
    with pytest.raises(ValueError, match="missing keys") as err:
        create_backbone(HIERA, weights="checkpoint", checkpoint=path)
    assert str(path) in str(err.value) and "blocks.1.attn.proj.bias" in str(err.value)


def test_checkpoint_of_another_backbone_is_refused(tmp_path):
    with torch.device("meta"):  # only the names and shapes matter
        small = timm.create_model("sam2_hiera_small", num_classes=0)
    state = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in small.state_dict().items()}
    path = tmp_path / "sam2_hiera_small.pt"
    torch.save({"model": to_sam2_layout(state)}, path)
    fits_not = r"does not fit backbone sam2_hiera_tiny.*unexpected keys.*blocks\.1[2-5]\."
    with pytest.raises(ValueError, match=fits_not):
        create_backbone(HIERA, weights="checkpoint", checkpoint=path)


def test_unknown_keys_in_sam2_file_are_refused(tmp_path):
    meta = to_sam2_layout({"pos_embed": torch.zeros(1)})
    meta["my_extra_head.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pt"
    torch.save({"model": meta}, path)
    with pytest.raises(ValueError, match="my_extra_head.weight"):
        create_backbone(HIERA, weights="checkpoint", checkpoint=path)


def test_sam2_checkpoint_into_a_vit_is_refused(tmp_path):
    path = tmp_path / "sam2.pt"
    torch.save({"model": to_sam2_layout({"pos_embed": torch.zeros(1)})}, path)
    with pytest.raises(ValueError, match="only fits sam2_hiera"):
        create_backbone(VIT, weights="checkpoint", checkpoint=path)


# 6. token split ----------------------------------------------------------------------------


def test_hiera_forward_splits_at_the_tokens(hiera, x):
    with torch.no_grad():
        maps = features(hiera, x)
        split = hiera.forward_tokens(hiera.embed(x))
        assert [torch.equal(a, b) for a, b in zip(maps, split)] == [True] * 4
        reference = hiera.model.forward_intermediates(x, indices=4, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(maps, reference)] == [True] * 4

        patches = hiera.embed_patches(x)
        assert patches.shape == (1, 16, 24, 96)
        # Position is added after the patch tokens, so a mask token placed in `patches` gets it too.
        position = hiera.add_pos_embed(torch.zeros_like(patches))
        assert position.abs().sum() > 0
        torch.testing.assert_close(hiera.embed(x), patches + position)


def test_swin_with_dynamic_img_size_trains_on_crops_and_runs_on_full_frames():
    """IV-tuning's MFNet recipe: built for 512x512 crops, evaluated on 480x640 frames. With timm's
    `dynamic_img_size` Swin computes its shifted-window masks per input, and on a frame equals a
    Swin built for that frame (same windows: every stage here is larger than the 7x7 window)."""
    crops = create_backbone(SWIN, weights="random", img_size=256, dynamic_img_size=True).eval()
    frames = create_backbone(SWIN, weights="random", img_size=[256, 320]).eval()
    frames.load_state_dict(crops.state_dict())
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        for a, b in zip(crops(x), frames(x), strict=True):
            torch.testing.assert_close(a, b)
        assert [m.shape[-2:] for m in crops(torch.randn(1, 3, 256, 256))] == [(256 // r,) * 2 for r in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match="multiples of 32"):
        crops(torch.randn(1, 3, 256, 300))


def test_swin_forward_splits_at_the_tokens(swin):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = features(swin, x)
        reference = swin.model.forward_intermediates(x, indices=4, intermediates_only=True)
        split = swin.forward_tokens(swin.embed(x))
    assert [torch.equal(a, b) for a, b in zip(maps, reference)] == [True] * 4
    assert [torch.equal(a, b) for a, b in zip(maps, split)] == [True] * 4
