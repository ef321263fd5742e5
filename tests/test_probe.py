"""The linear probe of Stage 1's diagnostics: the closed-form ridge fit against a direct least-
squares solution, streaming sums against one pass, and the probe end to end on encoders whose
features do and do not carry the labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.probe import PROBE_STRIDE, RidgeProbe, linear_probe


def test_ridge_fit_equals_least_squares_on_standardised_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * [1, 2, 3, 0.5, 4, 1] + [0, 1, -2, 3, 0, 5]
    labels = rng.integers(0, 4, size=300)
    ridge = 0.05
    probe = RidgeProbe(num_classes=4, ridge=ridge)
    for chunk in np.array_split(np.arange(300), 3):  # sums accumulated batch by batch
        probe.add(torch.tensor(x[chunk]), torch.tensor(labels[chunk]))
    probe.fit()

    # oracle: ridge regression as an augmented least-squares problem
    z = (x - x.mean(0)) / x.std(0)
    y = np.eye(4)[labels]
    y_centred = y - y.mean(0)
    augmented_z = np.vstack([z, np.sqrt(ridge * len(x)) * np.eye(6)])
    augmented_y = np.vstack([y_centred, np.zeros((6, 4))])
    expected, *_ = np.linalg.lstsq(augmented_z, augmented_y, rcond=None)
    np.testing.assert_allclose(probe.weights.numpy(), expected, rtol=1e-4, atol=1e-5)  # float32 batch sums

    features = torch.tensor(x[:5].T[None, :, :, None])  # (1, C, 5, 1)
    scores = probe.scores(features)[0, :, :, 0].T.numpy()
    np.testing.assert_allclose(scores, z[:5] @ expected + y.mean(0), rtol=1e-4, atol=1e-4)


def _batches(count: int, size: int = 32, classes: int = 3, seed: int = 0) -> list[dict]:
    """Task-style batches whose 'image' channel 0 holds a label map of 8-px vertical stripes
    (stripes, not blocks: bilinear upsampling of the cell scores is then exact at every pixel,
    while at a corner of four different blocks it is not)."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, classes, (count, 1, size // 8), generator=generator)
    labels = cells.repeat_interleave(8, 2).expand(count, size, size).contiguous()
    images = torch.randn(count, 3, size, size, generator=generator)
    images[:, 0] = labels.float()
    names = [f"{'day' if i % 2 else 'night'}_{i:05d}" for i in range(count)]
    return [{"thermal": images, "target": labels, "full_target": list(labels), "key": names,
             "meta": [{"name": n} for n in names]}]


def _label_encoder(images: torch.Tensor) -> list[torch.Tensor]:
    """Features that carry the class of every cell: one-hot of channel 0, pooled to strides 4-32."""
    one_hot = F.one_hot(images[:, 0].long(), 3).movedim(-1, 1).float()
    return [F.avg_pool2d(one_hot, stride) for stride in (4, 8, 16, 32)]


def _noise_encoder(images: torch.Tensor) -> list[torch.Tensor]:
    return [F.avg_pool2d(images[:, 1:], stride) for stride in (4, 8, 16, 32)]


@pytest.mark.parametrize(("encoder", "expected"), [(_label_encoder, 1.0), (_noise_encoder, None)])
def test_probe_reads_what_the_features_carry(encoder, expected):
    result = linear_probe(encoder, _batches(12), _batches(6, seed=1), stream="thermal", num_classes=3,
                          ignore_index=255, class_names=["a", "b", "c"], ridge=1e-4,
                          group_pattern="^(?P<group>day|night)_")
    assert result["fit_cells"] == 12 * (32 // PROBE_STRIDE) ** 2
    assert set(result["groups"]) == {"day", "night"}
    if expected is not None:
        assert result["overall"]["miou"] == pytest.approx(expected)
    else:  # noise features: no better than a blind guess
        assert result["overall"]["miou"] < 0.45
