"""A linear probe of frozen encoder features: how much of a labelled scene an encoder (with or
without a modality LoRA) makes linearly readable. Stage 1's diagnostic of feature quality.

Every image's four feature maps are resized (bilinear) to stride 8 and concatenated, so each
stride-8 cell is one sample of sum(channels) features, labelled with the class at the cell's
centre pixel. A ridge regression onto one-hot targets is fitted in closed form on standardised
features, from sums accumulated batch by batch (nothing but a C x C matrix is kept, so a large
fit split costs no memory). Scoring upsamples the per-cell class scores to each label's size
and computes mIoU with the same `SegmentationMetrics` as a task. No training loop and nothing
tuned: the probe compares encoders under identical conditions, it is not a segmenter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.metrics import SegmentationMetrics
from pipeline.training.task_data import sample_group

PROBE_STRIDE = 8
Encoder = Callable[[Tensor], list[Tensor]]  # images (B, 3, H, W) -> four NCHW feature maps


def cell_features(features: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Four feature maps -> (B, sum C, h, w) at the stride-8 grid `size`."""
    return torch.cat([F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False)
                      for f in features], dim=1)


class RidgeProbe:
    """Closed-form ridge regression of one-hot class targets on standardised features.

    `add` accumulates sums over (N, C) features and (N,) labels; `fit` solves
    (Z^T Z + ridge * N * I) W = Z^T (Y - mean Y) with Z the standardised features. Each batch's
    products are computed on the features' device in their dtype and summed in float64 on the
    CPU (a GPU's float64 is slow, and only the C x C sums need it); scores are float32.
    """

    def __init__(self, num_classes: int, ridge: float = 1e-2):
        self.num_classes = num_classes
        self.ridge = ridge
        self.count = 0
        self.sum_x = self.sum_xx = self.sum_xy = self.sum_y = None
        self.weights: Tensor | None = None

    def add(self, features: Tensor, labels: Tensor) -> None:
        x = features.float()
        y = F.one_hot(labels.long(), self.num_classes).to(x.dtype)
        sums = [x.sum(0), x.T @ x, x.T @ y, y.sum(0)]
        sums = [t.double().cpu() for t in sums]
        if self.sum_x is None:
            self.sum_x, self.sum_xx, self.sum_xy, self.sum_y = sums
        else:
            for total, batch in zip((self.sum_x, self.sum_xx, self.sum_xy, self.sum_y), sums, strict=True):
                total += batch
        self.count += x.shape[0]

    def fit(self) -> None:
        if not self.count:
            raise ValueError("linear probe: no labelled cells to fit")
        n = self.count
        self.mean = self.sum_x / n
        self.mean_y = self.sum_y / n
        covariance = self.sum_xx - n * torch.outer(self.mean, self.mean)
        self.std = (covariance.diagonal() / n).clamp_min(1e-12).sqrt()
        gram = covariance / torch.outer(self.std, self.std)
        cross = (self.sum_xy - n * torch.outer(self.mean, self.mean_y)) / self.std[:, None]
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        self.weights = torch.linalg.solve(gram + self.ridge * n * eye, cross)

    def scores(self, features: Tensor) -> Tensor:
        """(B, C, h, w) features -> (B, K, h, w) class scores, float32 on the features' device."""
        if self.weights is None:
            raise RuntimeError("fit the probe first")
        mean, std, weights, mean_y = (t.to(device=features.device, dtype=torch.float32)
                                      for t in (self.mean, self.std, self.weights, self.mean_y))
        z = (features.float().movedim(1, -1) - mean) / std
        return (z @ weights + mean_y).movedim(-1, 1)


def _grid(images: Tensor) -> tuple[int, int]:
    return images.shape[-2] // PROBE_STRIDE, images.shape[-1] // PROBE_STRIDE


@torch.no_grad()
def linear_probe(encoder: Encoder, fit_batches: Iterable[Mapping[str, Any]], test_batches: Iterable[Mapping[str, Any]],
                 *, stream: str, num_classes: int, ignore_index: int, class_names: list[str],
                 ridge: float = 1e-2, group_pattern: str | None = None) -> dict[str, Any]:
    """Fit a ridge probe of `encoder`'s features of `stream` on `fit_batches` (task batches:
    inputs, "target" at input size) and score it on `test_batches` ("full_target" at each
    label's own size): {"overall": SegmentationMetrics, "groups": {...}, "fit_cells": N}."""
    probe = RidgeProbe(num_classes, ridge)
    for batch in fit_batches:
        images = batch[stream]
        features = cell_features(encoder(images), _grid(images))  # on the encoder's device
        centres = batch["target"][:, PROBE_STRIDE // 2 :: PROBE_STRIDE, PROBE_STRIDE // 2 :: PROBE_STRIDE]
        centres = centres.to(features.device)
        keep = centres != ignore_index
        probe.add(features.movedim(1, -1)[keep], centres[keep])
    probe.fit()

    def new_metric(device: torch.device) -> SegmentationMetrics:
        return SegmentationMetrics(num_classes, ignore_index=ignore_index, class_names=class_names).to(device)

    overall, groups = None, {}
    for batch in test_batches:
        images = batch[stream]
        scores = probe.scores(cell_features(encoder(images), _grid(images)))
        overall = overall if overall is not None else new_metric(scores.device)
        for i, target in enumerate(batch["full_target"]):
            output = F.interpolate(scores[i: i + 1], size=tuple(target.shape), mode="bilinear",
                                   align_corners=False).argmax(1)
            target = target[None].to(scores.device)
            overall.update(output, target)
            group = sample_group(batch["meta"][i], batch["key"][i], group_pattern)
            if group is not None:
                groups.setdefault(group, new_metric(scores.device)).update(output, target)
    if overall is None:
        raise ValueError("linear probe: no labelled test images")
    return {"overall": overall.compute(), "groups": {g: m.compute() for g, m in sorted(groups.items())},
            "fit_cells": probe.count}
