"""Modality LoRAs: parameter count, identity at init, plain-peft round trip, refusal of a foreign
encoder, several named adapters in one frozen encoder, atomic export, provenance.

Random weights (no network); sam2_hiera_tiny at 64 px and small ranks keep it fast on a CPU.
Every test builds its own copy of the encoder, because peft changes a model in place.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from peft import PeftModel
from safetensors.torch import load_file

from pipeline import __version__
from pipeline.models.backbone import Backbone, create_backbone
from pipeline.models.lora import (
    IncompatibleLoraError,
    LoraSettings,
    MergedAdapters,
    add_lora,
    check_compatible,
    export_lora,
    load_lora,
    lora_parameters,
    lora_provenance,
    read_provenance,
    use_adapter,
)

HIERA = "sam2_hiera_tiny"
SMALL = LoraSettings(rank=4, alpha=8.0)
ARTIFACT_FILES = {"adapter_model.safetensors", "adapter_config.json", "xmodal.json"}


@pytest.fixture(scope="module")
def pristine() -> Backbone:
    """The seed-0 encoder; tests only ever use copies of it."""
    return create_backbone(HIERA, weights="random", seed=0)


@pytest.fixture
def fresh(pristine: Backbone) -> Callable[[], Backbone]:
    return lambda: copy.deepcopy(pristine)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def features(backbone: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return backbone.eval()(x)


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def assert_differ(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert any(not torch.equal(g, w) for g, w in zip(got, want, strict=True))


def perturb(peft_model: PeftModel, seed: int) -> None:
    """What training does to a LoRA: B leaves zero, so the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def trained_artifact(backbone: Backbone, out_dir: Path, seed: int = 1, **extra) -> Path:
    """Add a LoRA to `backbone`, perturb it, export it (the backbone keeps the LoRA)."""
    peft_model = add_lora(backbone, SMALL)
    perturb(peft_model, seed)
    return export_lora(peft_model, out_dir, lora_provenance(backbone, SMALL, peft_model, **extra))


def lora_flags(peft_model: PeftModel) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in peft_model.named_parameters() if ".lora_" in n}


def test_base_plus_rank32_trains_exactly_the_qkv_lora():
    backbone = create_backbone("sam2_hiera_base_plus", weights="random")
    peft_model = add_lora(backbone, LoraSettings())  # the config's rank 32 on every qkv

    trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 1_351_168
    assert lora_parameters(peft_model) == 1_351_168
    blocks = len(backbone.model.blocks)
    assert len(trainable) == 2 * blocks  # lora_A and lora_B of each block's qkv, nothing else
    assert all(re.fullmatch(r"model\.blocks\.\d+\.attn\.qkv\.lora_[AB]\.default\.weight", n) for n in trainable)


def test_new_lora_leaves_outputs_unchanged(fresh, x):
    backbone = fresh()
    before = features(backbone, x)
    add_lora(backbone, SMALL)
    assert_same(features(backbone, x), before)


def test_export_round_trips_through_plain_peft_and_load_lora(pristine, fresh, x, tmp_path):
    backbone = fresh()
    artifact = trained_artifact(backbone, tmp_path / "thermal")
    exported = features(backbone, x)
    assert_differ(exported, features(pristine, x))  # the perturbation matters

    assert {p.name for p in artifact.iterdir()} == ARTIFACT_FILES  # no peft model card
    keys = load_file(artifact / "adapter_model.safetensors").keys()
    assert len(keys) == 2 * len(pristine.model.blocks)
    assert all(re.fullmatch(r"base_model\.model\.blocks\.\d+\.attn\.qkv\.lora_[AB]\.weight", k) for k in keys)

    plain = timm.create_model(HIERA, num_classes=0)  # no xmodal involved from here
    missing, unexpected = plain.load_state_dict(pristine.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)  # the pruned head only
    plain_peft = PeftModel.from_pretrained(plain, artifact)
    with torch.no_grad():
        via_peft = plain_peft.get_base_model().forward_intermediates(x, indices=4, intermediates_only=True)
    assert_same(via_peft, exported)

    loaded = fresh()
    peft_model = load_lora(loaded, artifact, "thermal")
    assert_same(features(loaded, x), exported)
    assert lora_flags(peft_model) and not any(lora_flags(peft_model).values())
    assert not any(p.requires_grad for p in loaded.parameters())


def test_foreign_encoder_is_refused(fresh, tmp_path):
    artifact = trained_artifact(fresh(), tmp_path / "thermal")
    trained_in = read_provenance(artifact)["backbone"]["weights_fingerprint"]

    other_seed = create_backbone(HIERA, weights="random", seed=1)
    with pytest.raises(IncompatibleLoraError) as refused:
        load_lora(other_seed, artifact, "thermal")
    message = str(refused.value)
    assert trained_in in message and other_seed.weights_fingerprint in message and str(artifact) in message
    assert not any(".lora_" in n for n, _ in other_seed.named_parameters())  # checked before loading

    other_name = create_backbone("sam2_hiera_small", weights="random", seed=0)
    with pytest.raises(IncompatibleLoraError, match=rf"{HIERA}.*sam2_hiera_small"):
        check_compatible(read_provenance(artifact), other_name, artifact)


def test_named_adapters_share_one_frozen_encoder(pristine, fresh, x, tmp_path):
    thermal_dir = trained_artifact(fresh(), tmp_path / "thermal", seed=1)
    depth_dir = trained_artifact(fresh(), tmp_path / "depth", seed=2)
    alone = {}
    for name, artifact in (("thermal", thermal_dir), ("depth", depth_dir)):
        single = fresh()
        load_lora(single, artifact, name)
        alone[name] = features(single, x)
    assert_differ(alone["thermal"], alone["depth"])

    backbone = fresh()
    base_weight = backbone.model.blocks[0].attn.qkv.weight
    peft_model = load_lora(backbone, thermal_dir, "thermal")
    assert load_lora(backbone, depth_dir, "depth", peft_model) is peft_model
    flags = lora_flags(peft_model)
    assert len(flags) == 4 * len(pristine.model.blocks) and not any(flags.values())

    for name in ("depth", "thermal"):  # the active adapter is thermal, so start with depth
        with use_adapter(peft_model, name):
            assert_same(features(backbone, x), alone[name])
            assert lora_flags(peft_model) == flags
        assert lora_flags(peft_model) == flags
    with use_adapter(peft_model, None):  # RGB: no adapter
        assert_same(features(backbone, x), features(pristine, x))
    assert lora_flags(peft_model) == flags
    assert peft_model.active_adapter == "thermal"

    # One copy of the encoder: the adapters wrap the original tensors and add only their own.
    assert backbone.model.blocks[0].attn.qkv.base_layer.weight is base_weight
    total = sum(p.numel() for p in backbone.parameters())
    assert total == sum(p.numel() for p in pristine.parameters()) + 2 * lora_parameters(peft_model, "depth")

    # A loaded adapter re-exports under its own name with the layout of every artifact.
    again = export_lora(peft_model, tmp_path / "depth-again", read_provenance(depth_dir), adapter_name="depth")
    assert {p.name for p in again.iterdir()} == ARTIFACT_FILES
    want = load_file(depth_dir / "adapter_model.safetensors")
    got = load_file(again / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_use_adapter_keeps_a_training_lora_trainable_and_loaded_ones_frozen(fresh, x, tmp_path):
    thermal_dir = trained_artifact(fresh(), tmp_path / "thermal")
    backbone = fresh()
    peft_model = add_lora(backbone, SMALL)  # "default", in training
    load_lora(backbone, thermal_dir, "thermal", peft_model)
    flags = lora_flags(peft_model)
    assert any(".default." in n and v for n, v in flags.items())
    assert not any(".thermal." in n and v for n, v in flags.items())

    for name in ("thermal", None, "default"):
        with use_adapter(peft_model, name):
            features(backbone, x)
            assert lora_flags(peft_model) == flags
        assert lora_flags(peft_model) == flags
        assert peft_model.active_adapter == "default"

    with pytest.raises(ValueError, match="already loaded"):
        load_lora(backbone, thermal_dir, "thermal", peft_model)


def test_merged_adapters_run_the_same_encoder_with_one_matmul_per_layer(fresh, x, tmp_path):
    """Frozen adapters run as W + Delta W: per adapter the same features and input gradients as
    peft's W x + B A x on an identically loaded encoder (float rounding apart), no LoRA matmul
    runs, and leaving (also from a nested `use`, as activation checkpointing re-enters one in
    backward) puts back the encoder's own weights."""
    artifacts = {"thermal": trained_artifact(fresh(), tmp_path / "thermal", seed=1),
                 "depth": trained_artifact(fresh(), tmp_path / "depth", seed=2)}

    def loaded() -> tuple[Backbone, PeftModel]:
        backbone = fresh()
        peft_model = load_lora(backbone, artifacts["thermal"], "thermal")
        load_lora(backbone, artifacts["depth"], "depth", peft_model)
        return backbone, peft_model

    reference, reference_peft = loaded()
    backbone, peft_model = loaded()
    base_weight = backbone.model.blocks[0].attn.qkv.base_layer.weight
    merged = MergedAdapters(peft_model, ["thermal", "depth"])
    lora_calls = []
    hooks = [m.register_forward_hook(lambda *_: lora_calls.append(1))
             for n, m in peft_model.named_modules() if n.endswith(("lora_A.thermal", "lora_A.depth"))]

    def run(model: Backbone, context) -> tuple[list[torch.Tensor], torch.Tensor]:
        images = x.clone().requires_grad_()
        with context:
            maps = model.eval()(images)
        sum(m.square().mean() for m in maps).backward()
        return [m.detach() for m in maps], images.grad

    for name in ("thermal", "depth", None):
        got, got_grad = run(backbone, merged.use(name))
        want, want_grad = run(reference, use_adapter(reference_peft, name))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert_differ(run(backbone, merged.use("thermal"))[0], run(backbone, merged.use("depth"))[0])
    assert lora_calls == [] and not any(lora_flags(peft_model).values())
    for h in hooks:
        h.remove()

    qkv = backbone.model.blocks[0].attn.qkv.base_layer
    own = [block.attn.qkv.base_layer.weight for block in backbone.model.blocks]
    with merged.use("thermal"):
        thermal_weight = qkv.weight
        assert thermal_weight is not base_weight
        with merged.use(None):
            assert qkv.weight is base_weight
        with merged.use("depth"):
            assert qkv.weight is not thermal_weight
        assert qkv.weight is thermal_weight
    assert all(block.attn.qkv.base_layer.weight is w for block, w in zip(backbone.model.blocks, own, strict=True))

    backbone.double()  # moved or cast: the merged copies follow
    reference.double()
    with torch.no_grad(), merged.use("thermal"), use_adapter(reference_peft, "thermal"):
        assert qkv.weight.dtype == torch.float64
        for g, w in zip(backbone(x.double()), reference(x.double()), strict=True):
            torch.testing.assert_close(g, w)

    with pytest.raises(KeyError, match="not one of the merged"):
        merged.use("other").__enter__()
    with pytest.raises(ValueError, match="no adapter named 'rgb'"):
        MergedAdapters(peft_model, ["rgb"])
    training = fresh()
    with pytest.raises(ValueError, match=r"\['default'\].*train"):  # a LoRA in training cannot run merged
        MergedAdapters(add_lora(training, SMALL), ["default"])


def test_failed_export_keeps_the_previous_artifact(fresh, tmp_path, monkeypatch):
    backbone = fresh()
    out_dir = trained_artifact(backbone, tmp_path / "lora" / "thermal")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    peft_model = load_lora(fresh(), out_dir, "default")

    def save_half_then_fail(self, save_directory, **kwargs):
        Path(save_directory, "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_lora(peft_model, out_dir, read_provenance(out_dir))

    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert [p.name for p in out_dir.parent.iterdir()] == ["thermal"]  # no temporary folder left


def test_provenance_records_encoder_lora_and_caller_sections(fresh, tmp_path):
    backbone = fresh()
    extra = {
        "modality": {"name": "thermal", "encoding": "gray3", "normalization": {"mean": [0.5], "std": [0.2]}},
        "psst": {"mode": "full", "config_hash": "abc"},
        "shards": {"manifest_sha256": "def"},
        "losses": {"warmup": {"loss": 0.5}},
    }
    artifact = trained_artifact(backbone, tmp_path / "thermal", **extra)
    provenance = read_provenance(artifact)

    assert provenance == json.loads((artifact / "xmodal.json").read_text())
    assert provenance["format"] == "xmodal-modality-lora" and provenance["format_version"] == 1
    assert provenance["xmodal_version"] == __version__
    assert provenance["backbone"] == {
        "backbone": HIERA,
        "model_args": {},
        "weights": "random",
        "weights_source": "random-init(seed=0)",
        "weights_description": "random initialisation",
        "weights_fingerprint": backbone.weights_fingerprint,
        "is_random_init": True,
    }
    per_block = sum(SMALL.rank * (qkv.in_features + qkv.out_features)
                    for qkv in (block.attn.qkv for block in backbone.model.blocks))
    assert provenance["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["qkv"], "parameters": per_block}
    assert {k: provenance[k] for k in extra} == extra


def test_provenance_must_match_the_adapter_and_keep_its_sections(fresh):
    backbone = fresh()
    peft_model = add_lora(backbone, SMALL)
    with pytest.raises(ValueError, match="other LoRA settings"):
        lora_provenance(backbone, LoraSettings(rank=8, alpha=8.0), peft_model)
    with pytest.raises(ValueError, match="lora"):
        lora_provenance(backbone, SMALL, peft_model, lora={"rank": 1})


@pytest.mark.parametrize(
    ("content", "error", "says"),
    [
        (None, FileNotFoundError, "not found"),
        ("{not json", ValueError, "not valid JSON"),
        ('{"format": "something-else"}', ValueError, "not an xmodal modality LoRA"),
        ('{"format": "xmodal-modality-lora", "format_version": 2}', ValueError, "format_version 2"),
        ('{"format": "xmodal-modality-lora", "format_version": 1, "backbone": {}}', ValueError, "fingerprint"),
    ],
)
def test_read_provenance_names_the_bad_file(tmp_path, content, error, says):
    if content is not None:
        (tmp_path / "xmodal.json").write_text(content)
    with pytest.raises(error, match=says) as raised:
        read_provenance(tmp_path)
    assert str(tmp_path / "xmodal.json") in str(raised.value)


def test_settings_from_config():
    settings = LoraSettings.from_config({"rank": 16, "alpha": 32.0, "dropout": 0.1, "targets": ["qkv", "proj"]})
    assert settings == LoraSettings(rank=16, alpha=32.0, dropout=0.1, targets=("qkv", "proj"))
    config = settings.peft_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32.0, 0.1)
    assert config.target_modules == {"qkv", "proj"} and config.init_lora_weights is True
