"""Modality encodings: each named function checked on numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data.modalities import (
    ENCODINGS,
    build_encoding,
    encode_depth,
    encode_event,
    encode_hha,
    encode_polarization,
    encode_rgb,
    encode_thermal,
    events_to_voxel_grid,
    resolve_window,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_rgb_scales_to_unit_range():
    assert torch.equal(encode_rgb(t([[[0.0, 255.0]]] * 3)), t([[[0.0, 1.0]]] * 3))


def test_thermal_window_keeps_16bit_resolution_and_replicates():
    raw = t([[[29000.0, 29001.0, 30000.0, 31000.0, 40000.0]]])  # 1 x 1 x 5 raw counts
    out = encode_thermal(raw, window=(29000, 31000))
    assert out.shape == (3, 1, 5)
    torch.testing.assert_close(out[0, 0], t([0.0, 0.0005, 0.5, 1.0, 1.0]))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    # one count of a 16-bit camera is still visible after encoding (no 8-bit round trip)
    assert out[0, 0, 1] > out[0, 0, 0]
    with pytest.raises(ValueError, match="hi > lo"):
        encode_thermal(raw, window=(5, 5))


def test_thermal_from_three_channel_grey_image_is_averaged():
    raw = t([[[10.0]], [[20.0]], [[30.0]]])
    assert torch.allclose(encode_thermal(raw, window=(0, 40)), torch.full((3, 1, 1), 0.5))


def test_depth_millimetres_to_clipped_metric_range_with_invalid_zero():
    raw = t([[[0.0, 500.0, 2500.0, 5000.0, 20000.0]]])  # mm
    out = encode_depth(raw, min_metres=0.5, max_metres=4.5)
    torch.testing.assert_close(out[0, 0], t([0.0, 0.0, 0.5, 1.0, 1.0]))
    inverse = encode_depth(raw, min_metres=0.5, max_metres=4.5, inverse=True)
    torch.testing.assert_close(inverse[0, 0], t([0.0, 1.0, 0.5, 0.0, 0.0]))  # invalid stays 0
    lidar = ENCODINGS["lidar"](t([[[40000.0]]]), max_metres=80.0)  # LiDAR: a longer range
    torch.testing.assert_close(lidar[:, 0, 0], t([0.5, 0.5, 0.5]))


def test_hha_needs_three_channels():
    assert torch.equal(encode_hha(torch.full((3, 2, 2), 51.0)), torch.full((3, 2, 2), 0.2))
    with pytest.raises(ValueError, match="3 channels"):
        encode_hha(torch.zeros(1, 2, 2))


def test_events_to_voxel_grid_splits_polarity_between_time_bins():
    # x, y, t, polarity: t=0 -> bin 0; t=0.25 -> bins 0/1 half each (3 bins over [0, 1]);
    # t=1 -> last bin; polarity 0 counts as -1.
    events = np.array([[0, 0, 0.0, 1], [1, 0, 0.25, 1], [1, 1, 1.0, 0]], dtype=np.float64)
    grid = events_to_voxel_grid(events, num_bins=3, height=2, width=2)
    expected = np.zeros((3, 2, 2), np.float32)
    expected[0, 0, 0] = 1.0
    expected[0, 0, 1], expected[1, 0, 1] = 0.5, 0.5
    expected[2, 1, 1] = -1.0
    np.testing.assert_allclose(grid, expected)
    assert events_to_voxel_grid(np.zeros((0, 4)), 5, 3, 4).shape == (5, 3, 4)


def test_event_voxel_grid_to_thirds_and_event_images():
    grid = torch.zeros(6, 1, 2)
    grid[0, 0, 0], grid[1, 0, 0] = 1.0, 1.0  # early positive events at pixel 0
    grid[5, 0, 1] = -2.0  # one late negative event at pixel 1
    out = encode_event(grid, clip_percentile=100.0)  # scale = max |third| = 2
    torch.testing.assert_close(out[:, 0, 0], t([1.0, 0.5, 0.5]))
    torch.testing.assert_close(out[:, 0, 1], t([0.5, 0.5, 0.0]))
    image = torch.full((3, 2, 2), 255.0)
    assert torch.equal(encode_event(image, representation="image"), torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="at least 3 time bins"):
        encode_event(torch.zeros(2, 1, 1))


def test_polarization_is_periodic_in_pi():
    aolp = t([[[0.0, math.pi / 4, math.pi - 1e-6]]])
    dolp = t([[[0.2, 0.5, 1.5]]])
    out = encode_polarization(aolp, dolp)
    torch.testing.assert_close(out[0, 0], t([0.2, 0.5, 1.0]))  # DoLP, clipped to [0, 1]
    torch.testing.assert_close(out[1, 0], t([1.0, 0.5, 1.0]), atol=1e-5, rtol=0)  # cos 2θ
    torch.testing.assert_close(out[2, 0], t([0.5, 1.0, 0.5]), atol=1e-5, rtol=0)  # sin 2θ


STATS = {"min": [7000.0], "max": [9000.0], "percentiles": {"p1": 7100.0, "p99": 8900.0, "p2": 7200.0}}


def test_resolve_window_modes():
    assert resolve_window(STATS) == [7100.0, 8900.0]
    assert resolve_window(STATS, percentiles=(2, 99)) == [7200.0, 8900.0]
    assert resolve_window(STATS, mode="minmax") == [7000.0, 9000.0]
    assert resolve_window(STATS, mode="fixed", fixed=[1, 2]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="p5"):
        resolve_window(STATS, percentiles=(5, 99))
    with pytest.raises(ValueError, match="unknown window mode"):
        resolve_window(STATS, mode="auto")


def test_build_encoding_resolves_window_and_reads_sample_members():
    config = {"inputs": ["thermal"], "encoding": "thermal", "window": {"mode": "percentile"}}
    encoding = build_encoding("thermal", config, STATS)
    assert encoding.params == {"window": [7100.0, 8900.0]}
    out = encoding({"thermal": t([[[8000.0]]])})
    torch.testing.assert_close(out[:, 0, 0], t([0.5, 0.5, 0.5]))
    polar = build_encoding("polarization", {"inputs": ["aolp", "dolp"], "encoding": "polarization"}, None)
    assert polar({"aolp": torch.zeros(1, 1, 1), "dolp": torch.ones(1, 1, 1)}).shape == (3, 1, 1)
    with pytest.raises(KeyError, match="dolp"):
        polar({"aolp": torch.zeros(1, 1, 1)})
    with pytest.raises(ValueError, match="unknown encoding 'sonar'"):
        build_encoding("x", {"inputs": ["x"], "encoding": "sonar"}, None)
