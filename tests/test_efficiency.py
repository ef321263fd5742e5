"""Parameter counts at the seed paper's scale (the `paper_scale` stage), without training."""

from __future__ import annotations

import pytest

from pipeline.efficiency import lora_parameter_count, paper_scale_parameters
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.models.backbone import create_backbone
from pipeline.models.lora import LoraSettings, add_lora, lora_parameters
from tests.conftest import smoke_params


@pytest.mark.parametrize("settings", [LoraSettings(rank=4, alpha=4.0), LoraSettings(rank=8, targets=("qkv", "fc1"))])
def test_lora_count_equals_what_peft_builds(settings):
    backbone = create_backbone("sam2_hiera_tiny", weights="random", embed_dim=48)
    expected = lora_parameter_count(backbone, settings)
    assert expected == lora_parameters(add_lora(backbone, settings))  # the oracle: peft's own modules


def test_the_papers_modality_lora_size_on_hiera_base_plus():
    backbone = create_backbone("sam2_hiera_base_plus", weights="random")
    assert lora_parameter_count(backbone, LoraSettings(rank=32)) == 1_351_168  # design.md: Hiera-B+, rank 32, qkv


def test_cumulative_counts_share_the_encoder_and_each_modality_lora():
    params = smoke_params()
    cfg = {"backbone": "sam2_hiera_tiny", "method": "tp_mome", "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.0,
                                                                        "targets": ["qkv"]},
           "decoder": {"embed_dim": 16}, "reported": {"paper": {"total": 1.0}},
           "tasks": {"a": {"streams": ["rgb", "thermal"], "classes": 9},
                     "b": {"streams": ["rgb", "thermal", "depth"], "classes": 5}}}
    counts = paper_scale_parameters(cfg, params["methods"])
    backbone = create_backbone("sam2_hiera_tiny", weights="random")
    lora = lora_parameter_count(backbone, LoraSettings(rank=4))
    assert counts["encoder_parameters"] == sum(p.numel() for p in backbone.parameters())
    assert counts["modality_loras"] == {"depth": lora, "thermal": lora}  # thermal serves two tasks, counted once
    own = MethodSettings.from_config({**params["methods"]["tp_mome"], "modality_loras": False})
    model = TaskModel(backbone, ["rgb", "thermal"], own, head="segmentation", num_classes=9, decoder={"embed_dim": 16})
    assert counts["tasks"]["a"]["trainable"] == model.parameter_counts()["trainable"]  # prompts, TP-MoME, decoder
    assert counts["trainable"] == counts["tasks"]["a"]["trainable"] + counts["tasks"]["b"]["trainable"] + 2 * lora
    assert counts["total"] == counts["encoder_parameters"] + counts["trainable"]
    assert counts["reported"] == {"paper": {"total": 1.0}}
