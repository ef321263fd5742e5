"""Detection as a Stage-2 task on the demo: instance boxes from the renderer, shards with boxes,
finetune -> evaluate (COCO mAP overall and per lighting condition) -> predict."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.artifacts import PhaseOutputs, read_json
from pipeline.data.demo import BOX_CLASS_NAMES, CLASS_NAMES, generate_demo, instance_boxes, render_scene
from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset
from pipeline.data.types import BOX_LABELS, BOXES
from pipeline.predict import predict_folder
from pipeline.training.tasks import run_evaluate, run_finetune
from tests.conftest import smoke_params
from tests.test_stage2 import make_lora

SIZE = 64


def test_demo_boxes_are_the_visible_extents_of_each_object():
    arrays = render_scene(np.random.default_rng([0, 0, 5]), (128, 128), "day")
    label, boxes, classes = arrays["label"], arrays["boxes"], arrays["box_labels"]
    assert len(boxes) > 0 and boxes.dtype == np.float32
    for (x1, y1, x2, y2), cls in zip(boxes.astype(int), classes, strict=True):
        inside = label[y1:y2, x1:x2] == CLASS_NAMES.index(BOX_CLASS_NAMES[cls])
        # the object's class fills the box to its edges: every side touches an object pixel
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    # boxes from an instance map: two objects, one too small for a box
    instance = np.zeros((64, 128), np.int32)  # at the reference width: 6 pixels make a box
    instance[2:10, 3:7] = 1
    instance[20, 20:25] = 2
    out = instance_boxes(instance, [CLASS_NAMES.index("car"), CLASS_NAMES.index("person")])
    assert out["boxes"].tolist() == [[3, 2, 7, 10]] and out["box_labels"].tolist() == [1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("demo_det")
    generate_demo(tmp / "raw", image_size=(SIZE, SIZE), num_train=6, num_val=0, num_test=3, num_pool=0,
                  progress=False)
    reader = build_reader({"reader": "paired", "root": str(tmp / "raw" / "paired"), "modalities": ["rgb", "thermal"],
                           "classes_file": "../classes.json", "box_dir": "boxes"})
    manifest = shard_dataset(reader, tmp / "shards", name="demo", min_shards_per_split=2, progress=False)
    assert manifest["box_class_names"] == list(BOX_CLASS_NAMES)
    assert sum(manifest["splits"]["train"]["boxes"].values()) > 0
    sample = reader.load(reader.records("test")[0])
    text = (tmp / "raw" / "paired" / "test" / "boxes" / f"{sample['meta']['name']}.txt").read_text().splitlines()
    assert len(sample[BOXES]) == len(text) and sample[BOX_LABELS].max() < len(BOX_CLASS_NAMES)
    return tmp


def detection_params() -> dict:
    params = copy.deepcopy(smoke_params())
    params["tasks"]["rgbt_det"]["train"].update(epochs=2, samples_per_epoch=4, batch_size=2,
                                                checkpoint_every_n_steps=1)
    params["tasks"]["rgbt_det"]["label_fraction"] = 1.0
    return params


@pytest.mark.slow
def test_detection_task_trains_evaluates_and_predicts(demo, tmp_path):
    params = detection_params()
    task = params["tasks"]["rgbt_det"]
    assert task["head"] == "detection" and task["decoder"]["architecture"] == "fcos"
    lora_root = tmp_path / "lora"
    make_lora(params, lora_root / "thermal")
    run_dirs = {"checkpoints": tmp_path / "ckpt", "logs": tmp_path / "logs"}
    model_dir = tmp_path / "model"
    metrics = run_finetune(params, "rgbt_det", demo / "shards", lora_root,
                           PhaseOutputs(model_dir, tmp_path / "train.json", tmp_path / "loss.csv"), run_dirs,
                           progress=False)
    assert metrics["steps"] == 4 and metrics["head"] == "detection" and np.isfinite(metrics["loss_end"])
    info = read_json(model_dir / "seed0" / "task.json")
    assert info["classes"]["names"] == list(BOX_CLASS_NAMES)

    evaluation = run_evaluate(params, "rgbt_det", demo / "shards", model_dir, PhaseOutputs(tmp_path / "eval"),
                              progress=False)
    overall = evaluation["overall"]
    assert set(evaluation["groups"]) == {"day", "dusk", "night"}
    assert overall["images"] == 3 and sum(g["images"] for g in evaluation["groups"].values()) == 3
    assert set(overall["per_class_ap"]) == set(BOX_CLASS_NAMES)
    assert overall["map_50"] is None or 0.0 <= overall["map_50"] <= 1.0
    protocol = evaluation["protocol"]
    assert protocol["detection"]["iou_thresholds"][0] == 0.5 and protocol["detection"]["max_detections"][-1] == 100
    assert protocol["detection"]["score_thresh"] == 0.05 and "COCO" in protocol["metrics"]
    with Image.open(tmp_path / "eval" / "predictions.png") as figure:
        assert figure.width > 3 * SIZE  # rgb and thermal with predicted boxes, and the ground truth

    summary = predict_folder(model_dir / "seed0", {"reader": "paired", "root": str(demo / "raw" / "paired"),
                                                   "modalities": ["rgb", "thermal"]}, tmp_path / "pred",
                             splits=["test"], progress=False)
    assert summary["written"] == 3 and summary["head"] == "detection"
    written = read_json(tmp_path / "pred" / "test__night_00002.json")
    assert written["boxes_format"] == "xyxy pixels" and len(written["detections"]) <= 100
    for det in written["detections"]:
        assert det["class"] in BOX_CLASS_NAMES and 0 <= det["box"][0] <= det["box"][2] <= SIZE
    with Image.open(tmp_path / "pred" / "test__night_00002_boxes.png") as drawn:
        assert drawn.size == (SIZE, SIZE)


def test_detection_refuses_flip_averaging_and_a_dataset_without_boxes(demo):
    from pipeline.training.tasks import output_classes, scored_outputs

    with pytest.raises(ValueError, match="no boxes"):
        output_classes({"dataset": "mfnet", "class_names": ["a"]}, "detection")
    with pytest.raises(ValueError, match="eval.flip .* false for a detection task"):
        scored_outputs(None, {"rgb": torch.zeros(1, 3, 8, 8)}, [], head="detection", flip=True)


@pytest.mark.parametrize("name", ["tp_mome", "freeze", "full", "lora", "vpt", "iv_tuning", "cola"])
def test_every_stage2_method_trains_a_detection_head(name, tmp_path):
    """Each method's model with the FCOS head: one step's loss reaches the detector and the
    method's own trainable parts, and nothing frozen."""
    from pipeline.methods.stage2 import MethodSettings, TaskModel
    from pipeline.models.backbone import create_backbone
    from pipeline.models.detection import detection_loss

    params = smoke_params()
    torch.manual_seed(0)
    method = MethodSettings.from_config(params["methods"][name])
    lora_dirs = {"thermal": make_lora(params, tmp_path / "thermal")} if method.modality_loras else None
    model = TaskModel(create_backbone(**params["backbone"]), ["rgb", "thermal"], method, head="detection",
                      num_classes=3, decoder={"fpn_channels": 32, "num_convs": 1, "extra_levels": False},
                      lora_dirs=lora_dirs)
    images = {s: torch.randn(2, 3, 64, 64) for s in ("rgb", "thermal")}
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([2]),
                "crowd": torch.tensor([False])}, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                                                  "crowd": torch.zeros(0, dtype=torch.bool)}]
    loss = detection_loss(model(images), targets)
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum()}
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert torch.isfinite(loss) and not frozen_with_grad
    assert any(n.startswith("decoder.detector.head.") for n in trained)
    assert any(n.startswith("decoder.detector.backbone.fpn.") for n in trained)
    own = {"tp_mome": "prompts.", "vpt": "prompts.", "iv_tuning": "iv_tuning.", "cola": "cola.", "full": "backbone.",
           "lora": "backbone.", "freeze": "fusion."}[name]
    assert any(n.startswith(own) for n in trained), name
