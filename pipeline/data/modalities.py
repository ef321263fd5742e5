"""How each modality enters an RGB encoder: as a 3-channel float image in [0, 1].

Every encoding is a named function over CxHxW float32 tensors in the modality's *raw* units
(uint16 thermal counts, depth millimetres, ...), so 16-bit data keeps its precision through
decoding and augmentation and is quantised only here. Dataset-dependent parameters (e.g. the
thermal window) are resolved once from the shard manifest's statistics, then recorded with
every artifact that used them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data.types import Sample


def _to_3(x: Tensor) -> Tensor:
    return x.expand(3, *x.shape[-2:]).contiguous()


def _grey(x: Tensor) -> Tensor:
    """One channel: a 3-channel greyscale-as-colour image (common for thermal JPEGs) is averaged."""
    return x if x.shape[0] == 1 else x.mean(dim=0, keepdim=True)


def encode_rgb(rgb: Tensor) -> Tensor:
    """uint8-valued RGB to [0, 1]."""
    return rgb / 255.0


def encode_thermal(thermal: Tensor, *, window: Sequence[float]) -> Tensor:
    """Linear window [lo, hi] in raw counts -> [0, 1], clipped, replicated to 3 channels.

    A per-dataset window (percentiles of the raw histogram) keeps the full 16-bit dynamic
    range where the scene is, instead of a fixed 8-bit conversion that saturates hot objects.
    """
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"thermal window must have hi > lo, got [{lo}, {hi}]")
    return _to_3(((_grey(thermal) - lo) / (hi - lo)).clamp(0.0, 1.0))


def encode_depth(
    depth: Tensor,
    *,
    units_per_metre: float = 1000.0,
    min_metres: float = 0.0,
    max_metres: float = 10.0,
    inverse: bool = False,
) -> Tensor:
    """Metric depth (default: uint16 millimetres) clipped to [min, max] metres -> [0, 1].

    Invalid pixels (raw 0, as depth sensors report holes) map to 0. `inverse` maps near to
    bright (disparity-like), which spends the range on nearby structure.
    """
    if max_metres <= min_metres:
        raise ValueError(f"depth range must have max > min, got [{min_metres}, {max_metres}]")
    raw = _grey(depth)
    metres = (raw / units_per_metre).clamp(min_metres, max_metres)
    scaled = (metres - min_metres) / (max_metres - min_metres)
    if inverse:
        scaled = 1.0 - scaled
    return _to_3(torch.where(raw > 0, scaled, torch.zeros_like(scaled)))


def encode_hha(hha: Tensor) -> Tensor:
    """Precomputed HHA images (8-bit horizontal disparity, height, angle) to [0, 1]."""
    if hha.shape[0] != 3:
        raise ValueError(f"HHA must have 3 channels, got {hha.shape[0]}")
    return hha / 255.0


def events_to_voxel_grid(events: np.ndarray, num_bins: int, height: int, width: int) -> np.ndarray:
    """Event list (N x 4: x, y, t, polarity in {0,1} or {-1,1}) -> voxel grid (num_bins, H, W).

    Each event's polarity is split between its two nearest time bins (bilinear in time,
    as in E2VID), so the grid keeps sub-bin timing instead of quantising it away.
    """
    grid = np.zeros((num_bins, height, width), dtype=np.float32)
    if len(events) == 0:
        return grid
    x, y = events[:, 0].astype(np.int64), events[:, 1].astype(np.int64)
    t, p = events[:, 2].astype(np.float64), events[:, 3].astype(np.float32)
    p = np.where(p > 0, 1.0, -1.0).astype(np.float32)
    span = max(t.max() - t.min(), 1e-9)
    t_norm = (t - t.min()) / span * (num_bins - 1)
    left = np.floor(t_norm).astype(np.int64)
    frac = (t_norm - left).astype(np.float32)
    np.add.at(grid, (left, y, x), p * (1.0 - frac))
    right = np.minimum(left + 1, num_bins - 1)
    np.add.at(grid, (right, y, x), p * frac)
    return grid


def encode_event(event: Tensor, *, representation: str = "voxel", clip_percentile: float = 99.0) -> Tensor:
    """Events -> 3 channels in [0, 1].

    `voxel`: a voxel grid of B time bins; the channels are signed sums over the early, middle
    and late thirds, scaled by a robust per-image maximum, with 0.5 meaning "no events".
    `image`: an 8-bit 3-channel event frame (as DELIVER ships), taken as is.
    """
    if representation == "image":
        return _to_3(event) / 255.0
    if representation != "voxel":
        raise ValueError(f"event representation must be voxel or image, got {representation!r}")
    if event.shape[0] < 3:
        raise ValueError(f"an event voxel grid needs at least 3 time bins, got {event.shape[0]}")
    thirds = torch.stack([g.sum(dim=0) for g in torch.tensor_split(event, 3, dim=0)])
    scale = torch.quantile(thirds.abs().flatten(), clip_percentile / 100.0).clamp_min(1e-6)
    return (0.5 + 0.5 * (thirds / scale)).clamp(0.0, 1.0)


def encode_polarization(aolp: Tensor, dolp: Tensor) -> Tensor:
    """AoLP (radians, period pi) and DoLP ([0,1]) -> [DoLP, cos 2θ, sin 2θ] in [0, 1].

    Doubling the angle makes 0 and pi (the same polarisation) the same colour; DoLP as its own
    channel keeps weakly polarised regions distinguishable from strongly polarised ones.
    """
    theta = 2.0 * _grey(aolp)
    return torch.cat(
        [_grey(dolp).clamp(0.0, 1.0), 0.5 + 0.5 * torch.cos(theta), 0.5 + 0.5 * torch.sin(theta)]
    )


ENCODINGS: dict[str, Callable[..., Tensor]] = {
    "rgb": encode_rgb,
    "thermal": encode_thermal,
    "depth": encode_depth,
    "lidar": encode_depth,  # LiDAR range images are encoded like depth, with a longer range
    "hha": encode_hha,
    "event": encode_event,
    "polarization": encode_polarization,
}


def resolve_window(
    stats: Mapping[str, Any], *, mode: str = "percentile", percentiles: Sequence[float] = (1.0, 99.0),
    fixed: Sequence[float] | None = None,
) -> list[float]:
    """Thermal window from the manifest statistics of the modality.

    `percentile` uses the exact raw-histogram percentiles recorded while sharding, `minmax` the
    observed range, `fixed` the given [lo, hi] (e.g. a camera's calibrated range).
    """
    if mode == "fixed":
        if fixed is None or len(fixed) != 2:
            raise ValueError("window mode 'fixed' needs fixed: [lo, hi]")
        return [float(fixed[0]), float(fixed[1])]
    if mode == "minmax":
        return [min(stats["min"]), max(stats["max"])]
    if mode == "percentile":
        table = stats["percentiles"]
        keys = [f"p{p:g}" for p in percentiles]
        missing = [k for k in keys if k not in table]
        if missing:
            raise ValueError(f"percentiles {missing} not in the manifest (have {sorted(table)})")
        return [table[keys[0]], table[keys[1]]]
    raise ValueError(f"unknown window mode {mode!r}; use percentile, minmax or fixed")


@dataclass
class ModalityEncoding:
    """A configured encoding: which sample members it reads, which function, which params.

    Built from a `conf/modality/*.yaml` entry; `params` are fully resolved (no dataset lookups
    left), so they can be written into artifacts as the exact recipe.
    """

    name: str
    inputs: list[str]
    encoding: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(
                f"modality {self.name!r}: unknown encoding {self.encoding!r}; "
                f"available: {', '.join(sorted(ENCODINGS))}"
            )

    def __call__(self, sample: Sample) -> Tensor:
        missing = [i for i in self.inputs if i not in sample]
        if missing:
            raise KeyError(f"modality {self.name!r} needs sample members {missing}")
        return ENCODINGS[self.encoding](*(torch.as_tensor(sample[i]) for i in self.inputs), **self.params)


def build_encoding(name: str, config: Mapping[str, Any], stats: Mapping[str, Any] | None) -> ModalityEncoding:
    """Resolve a modality config against the manifest stats of its first input.

    Config: `{inputs: [thermal], encoding: thermal, params: {...}, window: {mode: percentile,
    percentiles: [1, 99]}}`; `window` is resolved into `params["window"]`.
    """
    params = dict(config.get("params") or {})
    window = config.get("window")
    if window is not None:
        if stats is None:
            raise ValueError(f"modality {name!r}: a window needs the manifest statistics")
        params["window"] = resolve_window(stats, **window)
    return ModalityEncoding(name, list(config["inputs"]), config["encoding"], params)
