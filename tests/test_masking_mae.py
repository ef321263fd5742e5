"""Hiera mask tokens and the MAE reconstruction loss."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.backbone import create_backbone
from pipeline.models.mae_decoder import MAEDecoder, masked_mean, reconstruction_loss, unit_errors
from pipeline.models.masking import MaskedEncoder, keyed_masks, random_unit_mask, scoring_masks


@pytest.fixture(scope="module")
def encoder() -> MaskedEncoder:
    return MaskedEncoder(create_backbone("sam2_hiera_tiny", weights="random")).eval()


def test_random_unit_mask_masks_exactly_the_ratio():
    mask = random_unit_mask(5, (4, 6), 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 4, 6) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [round(0.6 * 24)] * 5
    assert not torch.equal(mask[0], mask[1])  # each image draws its own units
    assert not random_unit_mask(2, (2, 2), 0.0).any()
    with pytest.raises(ValueError, match="mask ratio"):
        random_unit_mask(1, (2, 2), 1.0)


def test_keyed_masks_follow_the_image_not_its_rank_or_batch():
    grid = (4, 6)
    whole = keyed_masks(["a", "b", "c", "d"], grid, 0.5, seed=3, draw=1)
    # the same images split over two "ranks", or reordered, get the same masks
    rank0, rank1 = keyed_masks(["a", "c"], grid, 0.5, seed=3, draw=1), keyed_masks(["d", "b"], grid, 0.5, 3, 1)
    assert torch.equal(torch.stack([rank0[0], rank1[1], rank0[1], rank1[0]]), whole)
    assert whole.flatten(1).sum(1).tolist() == [12] * 4 and not torch.equal(whole[0], whole[1])
    assert not torch.equal(keyed_masks(["a"], grid, 0.5, seed=3, draw=2)[0], whole[0])  # a new step, a new mask
    assert not torch.equal(keyed_masks(["a"], grid, 0.5, seed=4, draw=1)[0], whole[0])


def test_scoring_masks_are_keyed_draws_no_training_step_makes():
    """Subset selection's masks: draws -1, -2, ... of the image's key, distinct from each other and
    from every training step's (draws 0, 1, 2, ...)."""
    grid = (4, 6)
    masks = scoring_masks(["a", "b"], grid, 0.5, seed=3, count=3)
    assert len(masks) == 3
    assert all(torch.equal(m, keyed_masks(["a", "b"], grid, 0.5, 3, -d)) for d, m in enumerate(masks, 1))
    assert torch.equal(scoring_masks(["b"], grid, 0.5, 3, 3)[2][0], masks[2][1])  # the key decides, not the batch
    assert len({tuple(m[0].flatten().tolist()) for m in masks}) == 3
    training = [keyed_masks(["a"], grid, 0.5, 3, step)[0] for step in range(8)]
    assert not any(torch.equal(m[0], t) for m in masks for t in training)


def test_ratio_zero_equals_the_plain_forward(encoder):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = encoder.backbone(x)
        no_mask = encoder(x, random_unit_mask(2, (2, 3), 0.0))
        none = encoder(x)
    for a, b, c in zip(plain, no_mask, none, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_mask_token_replaces_exactly_the_masked_patch_tokens(encoder, monkeypatch):
    x = torch.randn(1, 3, 64, 64)
    mask = torch.tensor([[[True, False], [False, False]]])
    seen = {}
    original = encoder.backbone.add_pos_embed

    def spy(tokens):
        seen["tokens"] = tokens
        return original(tokens)

    monkeypatch.setattr(encoder.backbone, "add_pos_embed", spy)
    with torch.no_grad():
        encoder(x, mask)
        patches = encoder.backbone.embed_patches(x)
    tokens = seen["tokens"]  # (1, 16, 16, C) at stride 4: unit (0, 0) is tokens [0:8, 0:8]
    assert torch.equal(tokens[0, :8, :8], encoder.mask_token.expand(8, 8, -1))
    assert torch.equal(tokens[0, 8:], patches[0, 8:]) and torch.equal(tokens[0, :8, 8:], patches[0, :8, 8:])
    with pytest.raises(ValueError, match="mask grid"):
        encoder(x, torch.zeros(1, 3, 3, dtype=torch.bool))


def test_masked_features_change_and_gradients_reach_the_mask_token(encoder):
    x = torch.randn(1, 3, 64, 64)
    mask = torch.tensor([[[True, False], [False, True]]])
    out = encoder(x, mask)
    assert not torch.equal(out[-1], encoder.backbone(x)[-1])
    out[-1].sum().backward()
    assert encoder.mask_token.grad is not None and encoder.mask_token.grad.abs().sum() > 0


def test_unit_errors_by_hand():
    target = torch.zeros(1, 1, 4, 4)
    prediction = torch.zeros(1, 1, 4, 4)
    prediction[0, 0, :2, :2] = 2.0  # unit (0,0) off by 2 everywhere -> MSE 4
    prediction[0, 0, 2:, 2:] = 1.0  # unit (1,1) off by 1 -> MSE 1
    errors = unit_errors(prediction, target, unit=2, normalize_targets=False)
    assert errors.tolist() == [[[4.0, 0.0], [0.0, 1.0]]]


def test_normalized_targets_are_standardised_per_unit():
    target = torch.arange(16.0).reshape(1, 1, 4, 4)
    errors = unit_errors(torch.zeros_like(target), target, unit=4, normalize_targets=True)
    # zero prediction vs a standardised target: mean square = variance / (variance + eps) ~ 1
    assert errors.item() == pytest.approx(15 / 16, rel=1e-4)  # unbiased var in the denominator


def test_mae_loss_ignores_visible_units():
    target = torch.zeros(2, 3, 64, 64)
    prediction = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    loss, errors = reconstruction_loss(prediction, target, mask, unit=32, normalize_targets=False)
    assert loss == pytest.approx(((errors[0, 0, 0] + errors[1, 1, 1]) / 2).item())
    changed = prediction.clone()
    changed[:, :, 32:, :32] += 100.0  # only visible units change
    assert reconstruction_loss(changed, target, mask, 32, False)[0] == pytest.approx(loss.item())
    assert masked_mean(errors, torch.zeros_like(mask)).item() == 0.0


def test_decoder_reconstructs_at_input_resolution(encoder):
    decoder = MAEDecoder(encoder.backbone.channels, dim=16)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert decoder(encoder(x)).shape == x.shape
