"""Detection: torchvision's FCOS over the fused maps, and COCO mAP (torchmetrics) overall, with
crowd regions, and over 2 gloo ranks."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FCOS

from pipeline.metrics.detection import DetectionMetrics
from pipeline.models.detection import FCOSDetectionHead, detection_loss
from tests.conftest import spawn_ranks

CHANNELS = [16, 32, 64, 128]


def fused(batch: int = 2, size: tuple[int, int] = (64, 96), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size[0] // s, size[1] // s, generator=g) for c, s in zip(CHANNELS, (4, 8, 16, 32))]


def targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 8.0, 90.0, 30.0]]), "labels": torch.tensor([1, 2])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # an image without objects


def test_the_head_is_torchvisions_fcos_on_an_fpn_and_trains_every_parameter():
    torch.manual_seed(0)
    head = FCOSDetectionHead(CHANNELS, num_classes=3, fpn_channels=32, num_convs=2)
    assert isinstance(head.detector, FCOS)
    outputs = head(fused(size=(128, 192)), (128, 192))
    # strides 8, 16, 32 and FCOS's P6, P7: 16x24 + 8x12 + 4x6 + 2x3 + 1x2 points
    assert outputs.num_anchors_per_level == [384, 96, 24, 6, 2]
    assert outputs.head_outputs["cls_logits"].shape == (2, 512, 3)
    # anchor points sit on each level's grid, sized by its stride (FCOS's scale ranges)
    anchors = outputs.anchors[0]
    torch.testing.assert_close(anchors[1], torch.tensor([4.0, -4.0, 12.0, 4.0]))
    torch.testing.assert_close(anchors[384 + 1], torch.tensor([8.0, -8.0, 24.0, 8.0]))
    losses = outputs.losses(targets())
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    loss = detection_loss(outputs, targets())
    torch.testing.assert_close(loss, sum(losses.values()))
    loss.backward()  # (on a 1x1 P7 map, GroupNorm over 2 values would cut the gradient: 128x192 here)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_the_loss_is_fcos_compute_loss_of_the_same_outputs():
    """The loss is torchvision's own: the same call on the same head outputs and anchors."""
    torch.manual_seed(0)
    head = FCOSDetectionHead(CHANNELS, num_classes=3, fpn_channels=32, num_convs=1)
    outputs = head(fused(), (64, 96))
    expected = head.detector.compute_loss(targets(), outputs.head_outputs, outputs.anchors,
                                          outputs.num_anchors_per_level)
    assert {k: v.item() for k, v in outputs.losses(targets()).items()} == {k: v.item() for k, v in expected.items()}


def test_detections_follow_fcos_postprocessing_and_strides_are_checked():
    torch.manual_seed(0)
    head = FCOSDetectionHead(CHANNELS, num_classes=3, strides=(4, 8, 16, 32), extra_levels=False, fpn_channels=32,
                             num_convs=1, score_thresh=0.0, detections_per_img=7).eval()
    with torch.no_grad():
        outputs = head(fused(), (64, 96))
        detections = outputs.detections()
    assert outputs.num_anchors_per_level == [384, 96, 24, 6]
    assert [len(d["boxes"]) for d in detections] == [7, 7]
    for d in detections:
        assert d["scores"].tolist() == sorted(d["scores"].tolist(), reverse=True)
        assert (d["boxes"][:, 0::2] >= 0).all() and (d["boxes"][:, 0::2] <= 96).all()  # clipped to the image
    assert head.protocol() == {"score_thresh": 0.0, "nms_thresh": 0.6, "detections_per_img": 7,
                               "topk_candidates": 1000}
    with pytest.raises(ValueError, match="increasing values of"):
        FCOSDetectionHead(CHANNELS, 3, strides=(16, 8))
    with pytest.raises(ValueError, match="fpn_channels=48: .*multiple of 32"):
        FCOSDetectionHead(CHANNELS, 3, fpn_channels=48)


def fixed_predictions() -> tuple[list[dict], list[dict]]:
    g = torch.Generator().manual_seed(1)
    preds, gts = [], []
    for i in range(6):
        boxes = torch.rand(4, 2, generator=g) * 60
        boxes = torch.cat([boxes, boxes + 10 + torch.rand(4, 2, generator=g) * 30], dim=1)
        labels = torch.randint(0, 3, (4,), generator=g)
        gts.append({"boxes": boxes, "labels": labels})
        noisy = boxes + torch.randn(4, 4, generator=g) * 3
        preds.append({"boxes": torch.cat([noisy, torch.rand(2, 4, generator=g).sort(1).values * 80]),
                      "scores": torch.rand(6, generator=g), "labels": torch.cat([labels, torch.tensor([0, 1])])})
    return preds, gts


def test_map_equals_torchmetrics_and_is_one_on_the_ground_truth():
    preds, gts = fixed_predictions()
    metrics = DetectionMetrics(["person", "bicycle", "car"])
    metrics.update(preds[:3], gts[:3])
    metrics.update(preds[3:], gts[3:])
    ours = metrics.compute()
    reference = MeanAveragePrecision(box_format="xyxy", class_metrics=True)
    reference.update(preds, gts)
    expected = reference.compute()
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert ours[key] == pytest.approx(float(expected[key]), abs=1e-12), key
    assert list(ours["per_class_ap"].values()) == pytest.approx(expected["map_per_class"].tolist())
    assert 0 < ours["map"] < 1 and ours["images"] == 6 and ours["boxes"] == 24 and ours["detections"] == 36

    perfect = DetectionMetrics(["person", "bicycle", "car"])
    perfect.update([{**t, "scores": torch.ones(len(t["labels"]))} for t in gts], gts)
    result = perfect.compute()
    assert (result["map"], result["map_50"], result["map_75"]) == (1.0, 1.0, 1.0)
    assert set(result["per_class_ap"].values()) == {1.0}


def test_crowd_regions_neither_match_nor_penalise_and_absent_classes_are_none():
    gt = {"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 80.0, 80.0]]), "labels": torch.tensor([0, 0]),
          "crowd": torch.tensor([False, True])}
    on_crowd = {"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [42.0, 42.0, 78.0, 78.0]]),
                "scores": torch.tensor([0.5, 0.9]), "labels": torch.tensor([0, 0])}
    metrics = DetectionMetrics(["person", "car"])
    metrics.update([on_crowd], [gt])
    result = metrics.compute()
    assert result["map_50"] == 1.0  # the higher-scored detection on the crowd region is no false positive
    assert result["per_class_ap"] == {"person": 1.0, "car": None}  # no car anywhere: undefined
    assert (result["boxes"], result["crowd_boxes"]) == (1, 1)
    plain = DetectionMetrics(["person", "car"])
    plain.update([on_crowd], [{**gt, "crowd": torch.tensor([False, False])}])
    assert plain.compute()["map_50"] == pytest.approx(1.0)  # both matched when the region is a real box
    missed = DetectionMetrics(["person", "car"])
    missed.update([on_crowd], [{"boxes": gt["boxes"][:1], "labels": gt["labels"][:1]}])
    assert missed.compute()["map_50"] < 1.0  # without the region, that detection is a false positive


def _unequal_targets() -> list[dict[str, torch.Tensor]]:
    """Two images with different foreground counts (two small objects / one large one)."""
    return [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 8.0, 90.0, 30.0]]), "labels": torch.tensor([1, 2])},
            {"boxes": torch.tensor([[4.0, 6.0, 80.0, 60.0]]), "labels": torch.tensor([0])}]


def _loss_gradients(images: list[int]) -> dict[str, torch.Tensor]:
    """Gradients of the detection loss over `images` of the fixed batch, for a fixed head."""
    torch.manual_seed(0)
    head = FCOSDetectionHead(CHANNELS, num_classes=3, fpn_channels=32, num_convs=1, extra_levels=False)
    features = [f[images] for f in fused()]  # (no P6/P7: GroupNorm needs more than one value per image)
    detection_loss(head(features, (64, 96)), [_unequal_targets()[i] for i in images]).backward()
    return {name: p.grad.clone() for name, p in head.named_parameters()}


def _gradients_as_rank(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        gradients = _loss_gradients([rank])
        for grad in gradients.values():  # what DDP does: the mean over ranks
            dist.all_reduce(grad)
            grad /= world
        torch.save(gradients, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_as_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """The losses are divided by the foreground count averaged over ranks (mmdetection's
    `reduce_mean(num_pos)`): DDP's mean of the rank gradients equals the gradient of the whole
    batch in one process. torchvision's per-rank count would not (checked below)."""
    assert spawn_ranks(_gradients_as_rank, 2, str(tmp_path / "init"), str(tmp_path / "g")) == [0, 0]
    single = _loss_gradients([0, 1])
    for rank in range(2):
        ranks = torch.load(tmp_path / f"g.{rank}", weights_only=True)
        for name, grad in single.items():
            torch.testing.assert_close(ranks[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    per_rank = [_loss_gradients([i]) for i in range(2)]  # outside a process group: torchvision's division
    cls = "detector.head.classification_head.cls_logits.weight"
    plain = (per_rank[0][cls] + per_rank[1][cls]) / 2
    assert (plain - single[cls]).abs().max() > 100 * (ranks[cls] - single[cls]).abs().max() + 1e-4


def _metrics_as_rank(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        preds, gts = fixed_predictions()
        metrics = DetectionMetrics(["person", "bicycle", "car"])
        mine = [i for i in range(len(preds)) if i % world == rank]
        metrics.update([preds[i] for i in mine], [gts[i] for i in mine])
        group = DetectionMetrics(["person", "bicycle", "car"])  # a group whose images are all on rank 0
        if rank == 0:
            group.update(preds[:2], gts[:2])
        Path(f"{out}.{rank}").write_text(json.dumps([metrics.compute(), group.compute()]))
    finally:
        dist.destroy_process_group()


def test_map_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    assert spawn_ranks(_metrics_as_rank, 2, str(tmp_path / "init"), str(tmp_path / "m")) == [0, 0]
    preds, gts = fixed_predictions()
    single, group = DetectionMetrics(["person", "bicycle", "car"]), DetectionMetrics(["person", "bicycle", "car"])
    single.update(preds, gts)
    group.update(preds[:2], gts[:2])
    expected = [single.compute(), group.compute()]
    for rank in range(2):
        assert json.loads((tmp_path / f"m.{rank}").read_text()) == expected


def test_bf16_autocast_keeps_anchors_and_box_decoding_in_float32():
    """On GPUs the head runs under bf16 autocast; anchor points and the loss's box decoding stay
    float32 (bf16 has steps of 4 pixels at x = 640)."""
    torch.manual_seed(0)
    head = FCOSDetectionHead(CHANNELS, num_classes=3, fpn_channels=32, num_convs=1)
    feats = fused(size=(640, 640))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = head(feats, (640, 640))
        assert outputs.head_outputs["bbox_regression"].dtype == torch.bfloat16
        losses = outputs.losses([{"boxes": torch.tensor([[601.0, 10.0, 637.0, 50.0]]), "labels": torch.tensor([1])}] * 2)
    assert all(a.dtype == torch.float32 for a in outputs.anchors)
    assert outputs.anchors[0][79].tolist() == [628.0, -4.0, 636.0, 4.0]  # the last point of the first row
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    head.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = head(feats, (640, 640)).detections()
    assert detections[0]["boxes"].dtype == torch.float32
