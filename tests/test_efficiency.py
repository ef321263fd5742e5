"""Parameter counts at the seed paper's scale (the `paper_scale` stage), without training."""

from __future__ import annotations

from pipeline.efficiency import paper_scale_parameters
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.models.backbone import create_backbone
from pipeline.models.lora import LoraSettings, add_lora, lora_parameters
from tests.conftest import smoke_params

CONFIG = {"backbone": "sam2_hiera_tiny", "method": "tp_mome", "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.0,
                                                                       "targets": ["qkv"]},
          "decoder": {"embed_dim": 16}, "reported": {"paper": {"total": 1.0}},
          "tasks": {"a": {"streams": ["rgb", "thermal"], "classes": 9},
                    "b": {"streams": ["rgb", "thermal", "depth"], "classes": 5}}}


def test_cumulative_counts_share_the_encoder_and_each_modality_lora():
    params = smoke_params()
    counts = paper_scale_parameters(CONFIG, params["methods"])
    backbone = create_backbone("sam2_hiera_tiny", weights="random")
    encoder = sum(p.numel() for p in backbone.parameters())
    lora = lora_parameters(add_lora(backbone, LoraSettings(rank=4, alpha=4.0)))  # peft's own count
    assert counts["encoder_parameters"] == counts["frozen_parameters"] == encoder
    assert counts["modality_loras"] == {"depth": lora, "thermal": lora}  # thermal serves two tasks, counted once
    own = MethodSettings.from_config({**params["methods"]["tp_mome"], "modality_loras": False})
    model = TaskModel(create_backbone("sam2_hiera_tiny", weights="random"), ["rgb", "thermal"], own,
                      head="segmentation", num_classes=9, decoder={"embed_dim": 16})
    assert counts["tasks"]["a"]["trainable"] == model.parameter_counts()["trainable"]  # prompts, TP-MoME, decoder
    assert counts["trainable"] == counts["tasks"]["a"]["trainable"] + counts["tasks"]["b"]["trainable"] + 2 * lora
    assert counts["total"] == encoder + counts["trainable"]
    assert counts["reported"] == {"paper": {"total": 1.0}}


def test_methods_that_train_or_adapt_the_encoder_count_it_per_task():
    params = smoke_params()
    full = paper_scale_parameters({**CONFIG, "method": "full"}, params["methods"])
    assert full["frozen_parameters"] == 0 and full["modality_loras"] == {}
    assert full["total"] == full["trainable"] == sum(t["total"] for t in full["tasks"].values())  # a copy each
    lora = paper_scale_parameters({**CONFIG, "method": "lora"}, params["methods"])
    assert lora["tasks"]["a"]["trainable"] < lora["tasks"]["b"]["trainable"]  # a task LoRA per stream, not piled up
    assert lora["total"] == lora["encoder_parameters"] + lora["trainable"]


def test_the_papers_modality_lora_size_on_hiera_base_plus():
    params = smoke_params()
    counts = paper_scale_parameters({**CONFIG, "backbone": "sam2_hiera_base_plus", "lora": {
        "rank": 32, "alpha": 32.0, "dropout": 0.0, "targets": ["qkv"]}, "tasks": {"a": CONFIG["tasks"]["a"]}},
        params["methods"])
    assert counts["modality_loras"] == {"thermal": 1_351_168}  # design.md: Hiera-B+, rank 32 on every qkv
