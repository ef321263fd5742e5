"""Salient object detection metrics with the definitions of PySODMetrics, in torch.

The numbers have to be comparable with published tables, which are computed by PySODMetrics
(and the MATLAB code it ports) from saved 8-bit PNGs. So each prediction is first quantised
as a PNG would be, then prepared as PySODMetrics prepares it: divided by 255, min-max
normalised unless constant; the ground truth is binarised (> 128 on a 0..255 scale). The
threshold curves bin the normalised map by truncating `p * 255`, as PySODMetrics does.

Scores are per image and averaged over images, so every state is a float64 sum over images
(`sum` under DDP): the per-image scalars and the 256-threshold E- and F-measure curves alike.
(List states would `cat` under DDP, and gloo aborts gathering them when a rank saw no image of a
group.) The weighted F-measure needs a Euclidean distance transform with nearest
indices and a MATLAB-style Gaussian filter: that part runs in scipy on the CPU, exactly as in
PySODMetrics.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import convolve, distance_transform_edt
from torch import Tensor
from torchmetrics import Metric

EPS = float(np.spacing(1))  # MATLAB's eps, as in PySODMetrics
LEVELS = 256
SCALARS = ("mae", "s_measure", "weighted_f_measure", "e_measure_adaptive", "f_measure_adaptive")
CURVES = ("e_measure_curve", "f_measure_curve")
RESULT_KEYS = (
    "mae", "s_measure", "weighted_f_measure",
    "e_measure_adaptive", "e_measure_mean", "e_measure_max",
    "f_measure_adaptive", "f_measure_mean", "f_measure_max",
)  # fmt: skip


class SODMetrics(Metric):
    """MAE, S-measure, weighted F-measure, E-measure and F-measure (adaptive, mean, max).

    S-measure uses alpha=0.5, the weighted F-measure beta^2=1 and the F-measure beta^2=0.3, the
    standard settings. Mean and max E/F-measure are the mean and the max over the 256
    thresholds of the curve averaged over images.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, alpha: float = 0.5, beta2: float = 0.3, weighted_beta2: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta2, self.weighted_beta2 = alpha, beta2, weighted_beta2
        for name in SCALARS:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in CURVES:
            self.add_state(name, default=torch.zeros(LEVELS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds: saliency in [0, 1], (B, H, W) or (B, 1, H, W); target: binary {0, 1} or {0, 255}."""
        preds, target = _as_maps(preds), _as_maps(target)
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} does not match target {tuple(target.shape)}")
        if preds.numel() and (preds.min() < 0 or preds.max() > 1):
            raise ValueError("saliency predictions must be probabilities in [0, 1]")
        masks = binarise_target(target)
        scores = [self._image_scores(normalise_prediction(p), g) for p, g in zip(preds, masks, strict=True)]
        for name in (*SCALARS, *CURVES):
            getattr(self, name).add_(sum(s[name] for s in scores))
        self.images += len(scores)

    def _image_scores(self, pred: Tensor, gt: Tensor) -> dict[str, Tensor]:
        """Every score of one image: pred float64 in [0, 1], gt bool."""
        gt_fg, size = int(gt.sum()), gt.numel()
        hits, misses = threshold_counts(pred, gt)
        threshold = min(2 * float(pred.mean()), 1.0)  # the adaptive threshold
        binary = pred >= threshold
        adaptive_hits, adaptive_misses = (binary & gt).sum(), (binary & ~gt).sum()
        wfm = weighted_f_measure(pred.cpu().numpy(), gt.cpu().numpy(), self.weighted_beta2)
        return {
            "mae": (pred - gt.double()).abs().mean(),
            "s_measure": s_measure(pred, gt, self.alpha),
            "weighted_f_measure": torch.tensor(wfm, dtype=torch.float64, device=pred.device),
            "e_measure_adaptive": e_measure(adaptive_hits, adaptive_misses, gt_fg, size),
            "f_measure_adaptive": f_measure(adaptive_hits, adaptive_misses, gt_fg, self.beta2),
            "e_measure_curve": e_measure(hits, misses, gt_fg, size),
            "f_measure_curve": f_measure(hits, misses, gt_fg, self.beta2),
        }

    def compute(self) -> dict:
        """JSON-ready averages over images; None for every score when no image was seen."""
        images = int(self.images)
        if images == 0:
            return dict.fromkeys(RESULT_KEYS) | {"images": 0}
        results = {name: float(getattr(self, name) / images) for name in SCALARS}
        for stem in ("e_measure", "f_measure"):
            curve = getattr(self, f"{stem}_curve") / images
            results[f"{stem}_mean"], results[f"{stem}_max"] = float(curve.mean()), float(curve.max())
        return {key: results[key] for key in RESULT_KEYS} | {"images": images}


def _as_maps(x: Tensor) -> Tensor:
    """(B, 1, H, W) -> (B, H, W); (B, H, W) unchanged."""
    return x.squeeze(1) if x.ndim == 4 and x.shape[1] == 1 else x


def binarise_target(target: Tensor) -> Tensor:
    """Bool masks from {0, 1} or {0, 255} targets (PySODMetrics: gt > 128 on 0..255)."""
    if target.dtype == torch.bool:
        return target
    return target > 128 if target.max() > 1 else target > 0.5


def normalise_prediction(pred: Tensor) -> Tensor:
    """One map as PySODMetrics sees a saved PNG: round(p * 255) / 255, then min-max if not constant."""
    pred = torch.round(pred.double() * 255) / 255
    low, high = pred.min(), pred.max()
    return (pred - low) / (high - low) if high != low else pred


def threshold_counts(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """(foreground, background) pixels with pred >= each of the 256 levels, from level 255 down."""
    levels = (pred * 255).long()  # truncation, like PySODMetrics' astype(np.uint8)
    fg = torch.bincount(levels[gt], minlength=LEVELS)
    bg = torch.bincount(levels[~gt], minlength=LEVELS)
    return fg.flip(0).cumsum(0), bg.flip(0).cumsum(0)


def f_measure(hits: Tensor, misses: Tensor, gt_fg: int, beta2: float) -> Tensor:
    """F-measure from predicted-foreground pixels inside (hits) and outside (misses) the GT."""
    hits = hits.double()
    precision = hits / (hits + misses).clamp_min(1)  # no predicted foreground -> no hits either
    recall = hits / max(gt_fg, 1)
    numerator = (1 + beta2) * precision * recall
    return numerator / torch.where(numerator == 0, 1.0, beta2 * precision + recall)


def e_measure(hits: Tensor, misses: Tensor, gt_fg: int, size: int) -> Tensor:
    """Enhanced-alignment measure (Fan et al., IJCAI 2018) from the four region sizes."""
    hits, misses = hits.double(), misses.double()
    pred_fg = hits + misses
    pred_bg = size - pred_fg
    if gt_fg == 0:
        total = pred_bg
    elif gt_fg == size:
        total = pred_fg
    else:
        pred_mean, gt_mean = pred_fg / size, gt_fg / size
        parts = (
            (hits, 1 - pred_mean, 1 - gt_mean),
            (misses, 1 - pred_mean, -gt_mean),
            (gt_fg - hits, -pred_mean, 1 - gt_mean),
            (pred_bg - (gt_fg - hits), -pred_mean, -gt_mean),
        )
        total = sum(count * _enhanced_alignment(p, g) for count, p, g in parts)
    return total / (size - 1 + EPS)


def _enhanced_alignment(pred_value: Tensor, gt_value: float) -> Tensor:
    align = 2 * (pred_value * gt_value) / (pred_value**2 + gt_value**2 + EPS)
    return (align + 1) ** 2 / 4


def s_measure(pred: Tensor, gt: Tensor, alpha: float) -> Tensor:
    """Structure measure (Fan et al., ICCV 2017): object- and region-aware similarity."""
    fg_ratio = gt.double().mean()
    if fg_ratio == 0:
        return 1 - pred.mean()
    if fg_ratio == 1:
        return pred.mean()
    score = alpha * _object_score(pred, gt, fg_ratio) + (1 - alpha) * _region_score(pred, gt)
    return score.clamp_min(0)


def _object_score(pred: Tensor, gt: Tensor, fg_ratio: Tensor) -> Tensor:
    return _object_similarity(pred[gt]) * fg_ratio + _object_similarity((1 - pred)[~gt]) * (1 - fg_ratio)


def _object_similarity(x: Tensor) -> Tensor:
    mean = x.mean()
    std = x.std() if x.numel() > 1 else 0.0  # unbiased, as PySODMetrics (ddof=1)
    return 2 * mean / (mean**2 + 1 + std + EPS)


def _region_score(pred: Tensor, gt: Tensor) -> Tensor:
    """Area-weighted SSIM of the four quadrants split at the GT centroid (MATLAB 1-based)."""
    h, w = gt.shape
    cy, cx = (int(c) + 1 for c in gt.nonzero().double().mean(dim=0).round())
    weights = [cx * cy / (h * w), cy * (w - cx) / (h * w), (h - cy) * cx / (h * w)]
    weights.append(1 - weights[0] - weights[1] - weights[2])
    rows, cols = (slice(0, cy), slice(cy, h)), (slice(0, cx), slice(cx, w))
    quadrants = [(r, c) for r in rows for c in cols]
    return sum(wt * _ssim(pred[r, c], gt[r, c].double()) for wt, (r, c) in zip(weights, quadrants, strict=True))


def _ssim(pred: Tensor, gt: Tensor) -> Tensor:
    """The S-measure's SSIM of one quadrant, with its special cases for flat regions."""
    n = pred.numel()
    x, y = pred.mean(), gt.mean()
    sigma_x = ((pred - x) ** 2).sum() / (n - 1 + EPS)
    sigma_y = ((gt - y) ** 2).sum() / (n - 1 + EPS)
    sigma_xy = ((pred - x) * (gt - y)).sum() / (n - 1 + EPS)
    numerator = 4 * x * y * sigma_xy
    denominator = (x**2 + y**2) * (sigma_x + sigma_y)
    if numerator != 0:
        return numerator / (denominator + EPS)
    return torch.ones_like(x) if denominator == 0 else torch.zeros_like(x)


def weighted_f_measure(pred: np.ndarray, gt: np.ndarray, beta2: float = 1.0) -> float:
    """Weighted F-measure (Margolin et al., CVPR 2014), ported from the MATLAB code as PySODMetrics does."""
    if not gt.any():
        return 0.0
    distance, (iy, ix) = distance_transform_edt(~gt, return_indices=True)
    error = np.abs(pred - gt)
    spread = error.copy()  # background pixels take the error at their nearest foreground pixel
    spread[~gt] = error[iy[~gt], ix[~gt]]
    smoothed = convolve(spread, _GAUSSIAN, mode="constant", cval=0)
    dependent = np.where(gt & (smoothed < error), smoothed, error)
    importance = np.where(gt, 1.0, 2 - np.exp(np.log(0.5) / 5 * distance))
    weighted = dependent * importance
    true_positive = gt.sum() - weighted[gt].sum()
    false_positive = weighted[~gt].sum()
    recall = 1 - weighted[gt].mean()
    precision = true_positive / (true_positive + false_positive + EPS)
    return float((1 + beta2) * recall * precision / (recall + beta2 * precision + EPS))


def _matlab_gaussian(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """MATLAB's fspecial('gaussian', size, sigma): a normalised, truncated 2-D Gaussian."""
    y, x = np.ogrid[-(size // 2) : size // 2 + 1, -(size // 2) : size // 2 + 1]
    kernel = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return kernel / kernel.sum()


_GAUSSIAN = _matlab_gaussian()
