"""Stage-2 metrics against their references: torchmetrics for segmentation, PySODMetrics for SOD."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from py_sod_metrics import MAE, Emeasure, Fmeasure, Smeasure, WeightedFmeasure
from scipy.ndimage import gaussian_filter
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from pipeline.metrics import MIOU_POLICY, SegmentationMetrics, SODMetrics

K, ABSENT = 5, 3  # class 3 appears in neither ground truth nor prediction
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


# --- segmentation ---------------------------------------------------------------------------


def segmentation_batches(seed: int = 0, batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Predictions right ~60% of the time, ~10% ignored pixels, class ABSENT nowhere."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        target = torch.randint(0, K, (2, 24, 32), generator=g)
        noise = torch.randint(0, K, target.shape, generator=g)
        preds = torch.where(torch.rand(target.shape, generator=g) < 0.6, target, noise)
        target[target == ABSENT], preds[preds == ABSENT] = 4, 0
        target[torch.rand(target.shape, generator=g) < 0.1] = 255
        out.append((preds, target))
    return out


def test_segmentation_matches_torchmetrics_including_an_absent_class():
    ours = SegmentationMetrics(K)
    per_class = MulticlassJaccardIndex(K, ignore_index=255, average=None)
    macro = MulticlassJaccardIndex(K, ignore_index=255, average="macro")
    pixel = MulticlassAccuracy(K, ignore_index=255, average="micro")
    class_mean = MulticlassAccuracy(K, ignore_index=255, average="macro")
    for i, (preds, target) in enumerate(segmentation_batches()):
        if i == 1:  # logits are argmaxed
            preds = F.one_hot(preds, K).permute(0, 3, 1, 2).float() + 0.1 * torch.rand(2, K, 24, 32)
        ours.update(preds, target)
        for reference in (per_class, macro, pixel, class_mean):
            reference.update(preds, target)
    result = ours.compute()
    reference_iou = per_class.compute().tolist()
    # torchmetrics reports the undefined IoU of the absent class as 0 (zero_division) but leaves it
    # out of the macro mean; we report None and leave it out too, so the means agree.
    assert reference_iou[ABSENT] == 0.0 and result["per_class_iou"][str(ABSENT)] is None
    for k in set(range(K)) - {ABSENT}:
        assert result["per_class_iou"][str(k)] == pytest.approx(reference_iou[k], rel=1e-6)
    assert result["miou"] == pytest.approx(macro.compute().item(), rel=1e-6)
    assert result["pixel_accuracy"] == pytest.approx(pixel.compute().item(), rel=1e-6)
    assert result["mean_accuracy"] == pytest.approx(class_mean.compute().item(), rel=1e-6)
    assert result["pixels"] == sum(int((t != 255).sum()) for _, t in segmentation_batches())
    assert result["miou_policy"] == MIOU_POLICY


def test_segmentation_by_hand():
    metric = SegmentationMetrics(4, class_names=["road", "car", "sky", "tree"])
    target = torch.tensor([[[0, 1], [1, 255]]])
    preds = torch.tensor([[[0, 1], [2, 3]]])  # sky predicted but not in GT; tree only where ignored
    metric.update(preds, target)
    result = metric.compute()
    assert result["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert result["per_class_iou"] == {"road": 1.0, "car": 0.5, "sky": 0.0, "tree": None}
    assert result["miou"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3: sky counts, tree does not
    assert result["pixel_accuracy"] == pytest.approx(2 / 3)
    assert result["per_class_accuracy"] == {"road": 1.0, "car": 0.5, "sky": None, "tree": None}
    assert result["mean_accuracy"] == pytest.approx(0.75)
    assert result["pixels"] == 3
    json.dumps(result, allow_nan=False)


def test_segmentation_states_merge_like_ddp_and_reset():
    batches = segmentation_batches(seed=1, batches=4)
    whole, left, right = SegmentationMetrics(K), SegmentationMetrics(K), SegmentationMetrics(K)
    for i, (preds, target) in enumerate(batches):
        whole.update(preds, target)
        (left if i % 2 else right).update(preds, target)
    left.merge_state(right)
    assert left.compute() == whole.compute()
    whole.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = whole.compute()
    assert empty["pixels"] == 0 and empty["miou"] is None and empty["pixel_accuracy"] is None


def test_segmentation_rejects_bad_input():
    with pytest.raises(ValueError, match="also a class"):
        SegmentationMetrics(K, ignore_index=0)
    with pytest.raises(ValueError, match="class names"):
        SegmentationMetrics(2, class_names=["a"])
    metric = SegmentationMetrics(K)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target holds"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), K))


# --- salient object detection ---------------------------------------------------------------

H, W = 40, 56


def blobs(rng: np.random.Generator) -> np.ndarray:
    """One or two ellipses: a plausible salient-object mask."""
    y, x = np.mgrid[:H, :W]
    mask = np.zeros((H, W), dtype=bool)
    for _ in range(rng.integers(1, 3)):
        cy, cx, ry, rx = rng.uniform(8, H - 8), rng.uniform(8, W - 8), rng.uniform(4, 10), rng.uniform(4, 14)
        mask |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    return mask


def saliency(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """A shifted, blurred, noisy copy of the mask, like a network's probabilities."""
    shifted = np.roll(gt.astype(float), tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
    return np.clip(0.8 * gaussian_filter(shifted, sigma=2) + 0.05 + rng.normal(0, 0.1, gt.shape), 0, 1)


def sod_images() -> list[tuple[np.ndarray, np.ndarray]]:
    """(float32 probabilities, bool mask) pairs: four realistic ones, then the edge cases."""
    rng = np.random.default_rng(0)
    masks = [blobs(rng) for _ in range(6)]
    pairs = [(saliency(rng, m), m) for m in masks[:4]]
    empty, full = np.zeros((H, W), dtype=bool), np.ones((H, W), dtype=bool)
    pairs += [
        (np.clip(rng.normal(0.1, 0.1, (H, W)), 0, 1), empty),  # all-zero GT
        (np.clip(rng.normal(0.8, 0.1, (H, W)), 0, 1), full),  # all-one GT
        (np.full((H, W), 0.3), masks[4]),  # constant prediction (not min-max normalised)
        (np.zeros((H, W)), masks[5]),  # all-zero prediction: adaptive threshold 0
    ]
    return [(p.astype(np.float32), m) for p, m in pairs]


def pysodmetrics(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The oracle, fed 8-bit PNG-like arrays as it expects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Fmeasure's deprecation notice
        mae, sm, wfm, em, fm = MAE(), Smeasure(), WeightedFmeasure(), Emeasure(), Fmeasure()
    for pred, gt in pairs:
        pred_png = np.round(pred.astype(np.float64) * 255).astype(np.uint8)
        gt_png = gt.astype(np.uint8) * 255
        for oracle in (mae, sm, wfm, em, fm):
            oracle.step(pred_png, gt_png)
    e, f = em.get_results()["em"], fm.get_results()["fm"]
    return {
        "mae": mae.get_results()["mae"],
        "s_measure": sm.get_results()["sm"],
        "weighted_f_measure": wfm.get_results()["wfm"],
        "e_measure_adaptive": e["adp"],
        "e_measure_mean": e["curve"].mean(),
        "e_measure_max": e["curve"].max(),
        "f_measure_adaptive": f["adp"],
        "f_measure_mean": f["curve"].mean(),
        "f_measure_max": f["curve"].max(),
    }


def assert_matches(result: dict, expected: dict[str, float], images: int) -> None:
    assert result.pop("images") == images
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(float(value), rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("index", range(8))
def test_sod_each_image_matches_pysodmetrics(index):
    pred, gt = sod_images()[index]
    metric = SODMetrics()
    metric.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    assert_matches(metric.compute(), pysodmetrics([(pred, gt)]), images=1)


@pytest.mark.parametrize("device", DEVICES)
def test_sod_dataset_matches_pysodmetrics_over_batches_and_formats(device):
    pairs = sod_images()
    preds = torch.from_numpy(np.stack([p for p, _ in pairs])).to(device)
    masks = torch.from_numpy(np.stack([m for _, m in pairs])).to(device)
    metric = SODMetrics().to(device)
    metric.update(preds[:5], masks[:5].to(torch.uint8) * 255)  # (B, H, W), {0, 255}
    metric.update(preds[5:, None], masks[5:, None].float())  # (B, 1, H, W), {0, 1}
    result = metric.compute()
    json.dumps(result, allow_nan=False)
    assert_matches(result, pysodmetrics(pairs), images=len(pairs))


def test_sod_states_merge_like_ddp():
    pairs = sod_images()
    preds = torch.from_numpy(np.stack([p for p, _ in pairs]))
    masks = torch.from_numpy(np.stack([m for _, m in pairs]))
    whole, left, right = SODMetrics(), SODMetrics(), SODMetrics()
    whole.update(preds, masks)
    left.update(preds[:3], masks[:3])
    right.update(preds[3:], masks[3:])
    left.merge_state(right)
    assert left.compute() == pytest.approx(whole.compute(), rel=1e-12)


def test_sod_rejects_bad_input_and_reports_nothing_when_empty():
    metric = SODMetrics()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(torch.full((1, 4, 4), 1.5), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(1, 4, 4), torch.ones(1, 4, 5))
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = SODMetrics().compute()
    assert empty.pop("images") == 0 and set(empty.values()) == {None}
