"""Semantic segmentation metrics from one dataset-level confusion matrix.

Summing a confusion matrix over the whole split (and over DDP ranks) and deriving every score
from it at the end gives dataset-level IoU, not a mean of per-image IoUs, which is what the
segmentation benchmarks report. Rows of the matrix are ground truth, columns are predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

MIOU_POLICY = (
    "mean IoU over classes present in the ground truth or the prediction; "
    "classes absent from both are excluded (their IoU is null)"
)


class SegmentationMetrics(Metric):
    """Per-class IoU, mIoU, pixel and class accuracy over a split.

    mIoU policy: a class with neither ground-truth nor predicted pixels has an undefined IoU
    (0/0); it is reported as None and left out of the mean, the same as torchmetrics'
    `MulticlassJaccardIndex(average="macro")`. A class predicted but absent from the ground truth
    has IoU 0 and counts. Mean accuracy averages over classes present in the ground truth.
    Pixels whose target is `ignore_index` are not evaluated.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is also a class id (0..{num_classes - 1})")
        names = [str(k) for k in range(num_classes)] if class_names is None else list(class_names)
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = names
        self.add_state(
            "confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds: class map (B, H, W) or logits (B, K, H, W); target: class map (B, H, W)."""
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} does not match target {tuple(target.shape)}")
        valid = target != self.ignore_index
        truth, guess = target[valid].long(), preds[valid].long()
        self._check_labels(truth, "target")
        self._check_labels(guess, "prediction")
        k = self.num_classes
        self.confusion += torch.bincount(truth * k + guess, minlength=k * k).reshape(k, k)

    def _check_labels(self, labels: Tensor, what: str) -> None:
        """An out-of-range id would silently land in another cell of the flattened matrix."""
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{what} holds class ids outside 0..{self.num_classes - 1} (and not ignore_index)")

    def compute(self) -> dict:
        """JSON-ready scores; undefined values (0/0) are None."""
        matrix = self.confusion.double()
        hits, truth, predicted = matrix.diag(), matrix.sum(dim=1), matrix.sum(dim=0)
        iou = hits / (truth + predicted - hits)  # NaN for classes absent from GT and prediction
        accuracy = hits / truth  # NaN for classes absent from GT
        return {
            "miou": _float_or_none(iou.nanmean()),
            "miou_policy": MIOU_POLICY,
            "per_class_iou": dict(zip(self.class_names, map(_float_or_none, iou), strict=True)),
            "pixel_accuracy": _float_or_none(hits.sum() / matrix.sum()),
            "mean_accuracy": _float_or_none(accuracy.nanmean()),
            "per_class_accuracy": dict(zip(self.class_names, map(_float_or_none, accuracy), strict=True)),
            "confusion_matrix": self.confusion.tolist(),
            "pixels": int(self.confusion.sum()),
        }


def _float_or_none(value: Tensor) -> float | None:
    """NaN (an undefined ratio) becomes None so metrics.json stays strict JSON."""
    number = float(value)
    return None if math.isnan(number) else number
