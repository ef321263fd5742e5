"""Repeated runs of one configuration (seeds) -> the mean and spread of every number they report.

A task trained over several seeds reports, for every numeric leaf of its per-seed metrics
(mIoU, a class IoU, a group's S-measure, a training time), the mean and the sample standard
deviation (ddof = 1, the usual "mean ± std over n seeds"; 0 for a single run, or when every
run gives the same value, which then keeps its type, e.g. a parameter count). Every other leaf
(a name, the list of streams, a confusion matrix) is kept when every run agrees and dropped
otherwise: differing confusion matrices stay in the per-seed records, where they mean something.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def mean_and_std(runs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mean tree, std tree) over `runs`, each a nested dict; only keys present in every run."""
    if not runs:
        raise ValueError("mean_and_std needs at least one run")
    return _combine(list(runs))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_DROPPED = object()  # a leaf the runs disagree on (mean) or that has no spread (std)


def _combine(values: list[Any]) -> tuple[Any, Any]:
    first = values[0]
    if all(isinstance(v, Mapping) for v in values):
        mean, std = {}, {}
        for key in first:
            if all(key in v for v in values):
                m, s = _combine([v[key] for v in values])
                if m is not _DROPPED:
                    mean[key] = m
                if s is not _DROPPED:
                    std[key] = s
        return mean, std
    if all(_is_number(v) for v in values):
        if all(v == first for v in values):  # e.g. parameter counts: the value itself, type kept
            return first, 0.0 if math.isfinite(first) else float("nan")
        floats = [float(v) for v in values]
        average = sum(floats) / len(floats)
        if not all(math.isfinite(v) for v in floats):
            return average, float("nan")
        spread = math.sqrt(sum((v - average) ** 2 for v in floats) / (len(floats) - 1))
        return average, spread
    return (first if all(v == first for v in values) else _DROPPED), _DROPPED
