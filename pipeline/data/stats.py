"""Per-modality statistics gathered in one pass while sharding.

Each image is summarised where it is decoded (a shard worker) into a small `ImageStats`; the
parent only adds summaries up. Integer images (uint8/uint16) are summarised by exact per-channel
value histograms, from which mean, std, range and percentiles all follow exactly, so a thermal
percentile window is exact, not estimated. Float maps keep moments and a strided pixel sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILES = (0.5, 1.0, 2.0, 5.0, 50.0, 95.0, 98.0, 99.0, 99.5)
_FLOAT_SAMPLE_PER_IMAGE = 4096


def _is_histogrammable(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2


@dataclass(frozen=True)
class ImageStats:
    """One image's contribution: sparse per-channel histograms (integer images) or moments
    (rows: sum, sum of squares, min, max) and a pixel sample (float images)."""

    dtype: str
    channels: int
    height: int
    width: int
    histograms: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None
    moments: np.ndarray | None = None
    sample: np.ndarray | None = None


def image_stats(array: np.ndarray) -> ImageStats:
    height, width = array.shape[:2]
    pixels = array.reshape(height * width, -1)
    channels = pixels.shape[1]
    if _is_histogrammable(array.dtype):
        offset = np.iinfo(array.dtype).min  # int8/int16 values shift to non-negative bins
        histograms = []
        for c in range(channels):
            counts = np.bincount(pixels[:, c].astype(np.int64) - offset)
            values = np.flatnonzero(counts)
            histograms.append((values + offset, counts[values]))
        return ImageStats(str(array.dtype), channels, height, width, histograms=tuple(histograms))
    as_float = pixels.astype(np.float64)
    moments = np.stack([as_float.sum(0), (as_float**2).sum(0), as_float.min(0), as_float.max(0)])
    step = max(1, pixels.size // _FLOAT_SAMPLE_PER_IMAGE)
    return ImageStats(str(array.dtype), channels, height, width, moments=moments, sample=as_float.ravel()[::step])


class ModalityStats:
    """Running statistics of one modality over a dataset (all splits together)."""

    def __init__(self) -> None:
        self.format: tuple[str, int] | None = None
        self.images = 0
        self.heights: list[int] = []
        self.widths: list[int] = []
        self.histograms: np.ndarray | None = None  # channels x 2**bits counts, integer images
        self.offset = 0  # value of bin 0 (negative for signed types)
        self.moments: np.ndarray | None = None
        self.samples: list[np.ndarray] = []

    def add(self, stats: ImageStats) -> None:
        if self.format is None:
            self.format = (stats.dtype, stats.channels)
            dtype = np.dtype(stats.dtype)
            if _is_histogrammable(dtype):
                self.offset = int(np.iinfo(dtype).min)
                self.histograms = np.zeros((stats.channels, 1 << (8 * dtype.itemsize)), np.int64)
        elif self.format != (stats.dtype, stats.channels):
            raise ValueError(
                f"modality changes format within the dataset: {self.format[0]} x{self.format[1]} "
                f"then {stats.dtype} x{stats.channels}"
            )
        if stats.histograms is not None:
            for channel, (values, counts) in enumerate(stats.histograms):
                self.histograms[channel, values - self.offset] += counts  # values are unique
        else:
            if self.moments is None:
                self.moments = stats.moments.copy()
            else:
                self.moments[:2] += stats.moments[:2]
                self.moments[2] = np.minimum(self.moments[2], stats.moments[2])
                self.moments[3] = np.maximum(self.moments[3], stats.moments[3])
            self.samples.append(stats.sample)
        self.images += 1
        self.heights.append(stats.height)
        self.widths.append(stats.width)

    def summary(self) -> dict[str, Any]:
        exact = self.moments is None
        if exact:
            values = np.arange(self.histograms.shape[1], dtype=np.float64) + self.offset
            counts = self.histograms.astype(np.float64)
            mean = (counts * values).sum(1) / counts.sum(1)
            std = np.sqrt((counts * (values - mean[:, None]) ** 2).sum(1) / counts.sum(1))
            low = [values[np.flatnonzero(row)[0]] for row in self.histograms]
            high = [values[np.flatnonzero(row)[-1]] for row in self.histograms]
            percentiles = self._histogram_percentiles()
        else:
            pixels = sum(h * w for h, w in zip(self.heights, self.widths))
            mean = self.moments[0] / pixels
            std = np.sqrt(np.maximum(self.moments[1] / pixels - mean**2, 0.0))
            low, high = self.moments[2], self.moments[3]
            sample = np.concatenate(self.samples)
            percentiles = dict(zip(PERCENTILES, np.percentile(sample, PERCENTILES).tolist()))
        return {
            "dtype": self.format[0],
            "channels": self.format[1],
            "images": self.images,
            "height": [min(self.heights), max(self.heights)],
            "width": [min(self.widths), max(self.widths)],
            "mean": _round(mean),
            "std": _round(std),
            "min": _round(low),
            "max": _round(high),
            "percentiles": {f"p{p:g}": round(float(v), 6) for p, v in percentiles.items()},
            "percentiles_exact": exact,
        }

    def _histogram_percentiles(self) -> dict[float, float]:
        """Smallest value v with P(x <= v) >= p, all channels pooled."""
        cdf = np.cumsum(self.histograms.sum(0)) / self.histograms.sum()
        return {p: float(np.searchsorted(cdf, p / 100.0) + self.offset) for p in PERCENTILES}


def _round(values) -> list[float]:
    return [round(float(v), 6) for v in values]
