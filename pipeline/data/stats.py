"""Per-modality statistics gathered in one pass while sharding.

Integer images (uint8/uint16) keep an exact value histogram, so percentile windows for
thermal or depth (e.g. the 1st-99th percentile) are exact, not estimated from a sample.
Float maps keep moments and a deterministic strided pixel sample for their percentiles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PERCENTILES = (0.5, 1.0, 2.0, 5.0, 50.0, 95.0, 98.0, 99.0, 99.5)
_FLOAT_SAMPLE_PER_IMAGE = 4096


class ModalityStats:
    """Running statistics of one modality over a dataset (all splits together)."""

    def __init__(self) -> None:
        self.dtype: str | None = None
        self.channels: int | None = None
        self.images = 0
        self.pixels = 0
        self.sum: np.ndarray | None = None
        self.sum_sq: np.ndarray | None = None
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self.histogram: np.ndarray | None = None  # integer dtypes, all channels pooled
        self.float_sample: list[np.ndarray] = []
        self.heights: list[int] = []
        self.widths: list[int] = []

    def update(self, array: np.ndarray) -> None:
        pixels = array.reshape(array.shape[0] * array.shape[1], -1)
        if self.dtype is None:
            self.dtype, self.channels = str(array.dtype), pixels.shape[1]
            self.sum = np.zeros(self.channels)
            self.sum_sq = np.zeros(self.channels)
            self.min = np.full(self.channels, np.inf)
            self.max = np.full(self.channels, -np.inf)
        elif (str(array.dtype), pixels.shape[1]) != (self.dtype, self.channels):
            raise ValueError(
                f"modality changes format within the dataset: {self.dtype} x{self.channels} "
                f"then {array.dtype} x{pixels.shape[1]}"
            )
        as_float = pixels.astype(np.float64)
        self.sum += as_float.sum(axis=0)
        self.sum_sq += (as_float**2).sum(axis=0)
        self.min = np.minimum(self.min, as_float.min(axis=0))
        self.max = np.maximum(self.max, as_float.max(axis=0))
        if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize <= 2:
            counts = np.bincount(pixels.ravel().astype(np.int64), minlength=1 << (8 * array.dtype.itemsize))
            self.histogram = counts if self.histogram is None else self.histogram + counts
        else:
            step = max(1, pixels.size // _FLOAT_SAMPLE_PER_IMAGE)
            self.float_sample.append(pixels.ravel()[::step].astype(np.float64))
        self.images += 1
        self.pixels += pixels.shape[0]
        self.heights.append(array.shape[0])
        self.widths.append(array.shape[1])

    def percentiles(self) -> dict[str, float]:
        if self.histogram is not None:
            cdf = np.cumsum(self.histogram) / self.histogram.sum()
            values = {p: float(np.searchsorted(cdf, p / 100.0)) for p in PERCENTILES}
        else:
            sample = np.concatenate(self.float_sample)
            values = dict(zip(PERCENTILES, np.percentile(sample, PERCENTILES).tolist()))
        return {f"p{p:g}": v for p, v in values.items()}

    def summary(self) -> dict[str, Any]:
        mean = self.sum / self.pixels
        std = np.sqrt(np.maximum(self.sum_sq / self.pixels - mean**2, 0.0))
        return {
            "dtype": self.dtype,
            "channels": self.channels,
            "images": self.images,
            "height": [min(self.heights), max(self.heights)],
            "width": [min(self.widths), max(self.widths)],
            "mean": _round(mean),
            "std": _round(std),
            "min": _round(self.min),
            "max": _round(self.max),
            "percentiles": {k: round(v, 6) for k, v in self.percentiles().items()},
            "percentiles_exact": self.histogram is not None,
        }


def _round(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]
