"""Aggregating a task's seeds: mean and sample std of every number, against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics.seeds import mean_and_std


def test_mean_and_sample_std_of_every_numeric_leaf():
    runs = [
        {"overall": {"miou": 0.30, "per_class_iou": {"car": 0.2, "bike": None}}, "steps": 12, "name": "a",
         "confusion_matrix": [[1, 2], [3, 4]], "groups": {"night": {"miou": 0.1}}},
        {"overall": {"miou": 0.34, "per_class_iou": {"car": 0.4, "bike": None}}, "steps": 12, "name": "a",
         "confusion_matrix": [[5, 6], [7, 8]], "groups": {"night": {"miou": 0.2}, "day": {"miou": 0.5}}},
        {"overall": {"miou": 0.41, "per_class_iou": {"car": 0.3, "bike": None}}, "steps": 12, "name": "a",
         "confusion_matrix": [[0, 0], [0, 0]], "groups": {"night": {"miou": 0.6}}},
    ]
    mean, std = mean_and_std(runs)
    values = [0.30, 0.34, 0.41]
    assert mean["overall"]["miou"] == pytest.approx(np.mean(values))
    assert std["overall"]["miou"] == pytest.approx(np.std(values, ddof=1))
    assert std["groups"]["night"]["miou"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert "day" not in mean["groups"]  # not measured in every run
    assert mean["steps"] == 12 and isinstance(mean["steps"], int) and std["steps"] == 0.0  # equal: kept as is
    assert mean["name"] == "a" and "name" not in std
    assert mean["overall"]["per_class_iou"]["bike"] is None and "bike" not in std["overall"]["per_class_iou"]
    assert "confusion_matrix" not in mean  # differing lists stay per seed


def test_agreeing_runs_have_no_spread_and_disagreeing_strings_are_dropped():
    mean, std = mean_and_std([{"miou": 0.5, "split": "test", "streams": ["rgb", "thermal"]}] * 2)
    assert mean == {"miou": 0.5, "split": "test", "streams": ["rgb", "thermal"]} and std == {"miou": 0.0}
    mean, _ = mean_and_std([{"split": "test"}, {"split": "val"}])
    assert mean == {}
    mean, std = mean_and_std([{"x": float("nan")}, {"x": 1.0}])
    assert math.isnan(mean["x"]) and math.isnan(std["x"])
    with pytest.raises(ValueError, match="at least one run"):
        mean_and_std([])
