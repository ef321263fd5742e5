"""PSST's losses against their formulas and against the reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss

from pipeline.methods.psst import ErrorWeightedPatchLoss, StepCenteredDINOLoss, select_top_fraction, unit_weights


def make_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[[True, False, True], [False, True, False]],
                         [[False, False, False], [True, True, False]]])
    errors = torch.rand(2, 2, 3, generator=g) * 3
    n = int(mask.sum())
    return mask, errors, torch.randn(n, 7, generator=g), torch.randn(n, 7, generator=g)


def test_unit_weights_are_a_softmax_of_alpha_times_error_over_masked_units():
    mask, errors, _, _ = make_case()
    weights = unit_weights(errors, mask, alpha=2.0)
    for b in range(2):
        denominator = sum(math.exp(2.0 * errors[b, i, j].item())
                          for i in range(2) for j in range(3) if mask[b, i, j])
        for i in range(2):
            for j in range(3):
                expected = math.exp(2.0 * errors[b, i, j].item()) / denominator if mask[b, i, j] else 0.0
                assert weights[b, i, j].item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(weights.sum(dim=(1, 2)), torch.ones(2))
    uniform = unit_weights(errors, mask, alpha=0.0)
    assert torch.allclose(uniform[mask], (1.0 / mask.sum(dim=(1, 2)).float()).repeat_interleave(mask.sum(dim=(1, 2))))
    assert not unit_weights(errors, torch.zeros_like(mask), 1.0).isnan().any()


def test_higher_error_gets_more_weight_and_errors_are_detached():
    errors = torch.tensor([[[0.1, 0.5, 2.0]]], requires_grad=True)
    mask = torch.ones(1, 1, 3, dtype=torch.bool)
    weights = unit_weights(errors, mask, alpha=1.0)
    assert weights[0, 0, 0] < weights[0, 0, 1] < weights[0, 0, 2]
    assert not weights.requires_grad


def test_weighted_patch_loss_equals_its_formula():
    mask, errors, teacher, student = make_case(1)
    loss_fn = ErrorWeightedPatchLoss(7, teacher_temp=0.07, student_temp=0.2, center_momentum=0.9)
    loss_fn.center.center.copy_(torch.linspace(-0.5, 0.5, 7)[None])  # a non-trivial centre
    center = loss_fn.center.value.clone()
    weights = unit_weights(errors, mask, alpha=1.5)
    loss = loss_fn(teacher, student, mask, weights)
    # direct: sum over images and masked units of w_i * CE(teacher_i, student_i), over B
    total = 0.0
    flat_weights = weights[mask]
    for k in range(teacher.shape[0]):
        t = torch.softmax((teacher[k] - center[0]) / 0.07, dim=-1)
        s = torch.log_softmax(student[k] / 0.2, dim=-1)
        total += flat_weights[k].item() * -(t * s).sum().item()
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)
    assert torch.equal(loss_fn.center.value, center)  # the centre moves at the optimizer step, not here
    loss_fn.step_center()
    # ... towards the teacher's mean output, as in iBOT
    assert torch.allclose(loss_fn.center.value, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True), atol=1e-6)


def test_uniform_weights_reproduce_lightly_ibot_patch_loss():
    mask, errors, teacher, student = make_case(2)
    ours = ErrorWeightedPatchLoss(7, teacher_temp=0.04, student_temp=0.1)
    reference = IBOTPatchLoss(7, teacher_temp=0.04, student_temp=0.1)
    for step in range(3):  # also after the centres have moved (one forward per optimizer step)
        a = ours(teacher + step, student, mask, unit_weights(errors, mask, alpha=0.0))
        b = reference(teacher + step, student, mask)
        ours.step_center()
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
        assert torch.allclose(ours.center.value, reference.center.value, atol=1e-7)


def test_step_centred_dino_loss_is_lightlys_with_one_forward_per_step():
    g = torch.Generator().manual_seed(4)
    ours, reference = StepCenteredDINOLoss(16, teacher_temp=0.05), DINOLoss(16, teacher_temp=0.05)
    for _ in range(3):
        teacher = [torch.randn(4, 16, generator=g) for _ in range(2)]
        student = [torch.randn(4, 16, generator=g) for _ in range(3)]
        a, b = ours(teacher, student, teacher_temp=0.05), reference(teacher, student, teacher_temp=0.05)
        ours.step_center()
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
        assert torch.allclose(ours.center, reference.center, atol=1e-7)


def test_accumulated_micro_batches_move_the_centres_as_one_batch():
    """Two half-batches then one optimizer step = one whole batch (gradient accumulation)."""
    g = torch.Generator().manual_seed(5)
    teacher = [torch.randn(4, 16, generator=g) for _ in range(2)]
    student = [torch.randn(4, 16, generator=g) for _ in range(2)]
    whole, halves = StepCenteredDINOLoss(16), StepCenteredDINOLoss(16)
    whole(teacher, student)
    whole.step_center()
    for part in (slice(0, 2), slice(2, 4)):
        halves([t[part] for t in teacher], [s[part] for s in student])
    assert torch.equal(halves.center, torch.zeros_like(halves.center))  # nothing moved before the step
    halves.step_center()
    assert torch.allclose(halves.center, whole.center, atol=1e-7)

    # PSST masks the same number of units in every image (random_unit_mask): 3 of 6 here
    mask = torch.tensor([[[True, False, True], [False, True, False]], [[False, True, False], [True, False, True]]])
    teacher_patch, student_patch = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    weights = unit_weights(torch.rand(2, 2, 3, generator=g), mask, alpha=1.0)
    whole_patch, halves_patch = ErrorWeightedPatchLoss(7), ErrorWeightedPatchLoss(7)
    whole_patch(teacher_patch, student_patch, mask, weights)
    whole_patch.step_center()
    split = int(mask[0].sum())
    halves_patch(teacher_patch[:split], student_patch[:split], mask[:1], weights[:1])
    halves_patch(teacher_patch[split:], student_patch[split:], mask[1:], weights[1:])
    halves_patch.step_center()
    assert torch.allclose(halves_patch.center.value, whole_patch.center.value, atol=1e-7)


def original_dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp):
    """facebookresearch/dino `DINOLoss.forward` (main_dino.py), without the centre update."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def test_image_loss_as_called_in_joint_training_matches_original_dino():
    # JointTraining passes per-view lists: 2 teacher globals, student globals then locals.
    g = torch.Generator().manual_seed(3)
    batch, dim, local = 4, 16, 3
    teacher = [torch.randn(batch, dim, generator=g) for _ in range(2)]
    student = [torch.randn(batch, dim, generator=g) for _ in range(2 + local)]
    loss = DINOLoss(dim, teacher_temp=0.05, student_temp=0.1)
    ours = loss(teacher, student, teacher_temp=0.05)
    reference = original_dino_loss(torch.cat(student), torch.cat(teacher), torch.zeros(1, dim),
                                   ncrops=2 + local, student_temp=0.1, teacher_temp=0.05)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_select_top_fraction():
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.5, "e": 0.2}
    assert select_top_fraction(scores, 0.5) == ["b", "c", "d"]  # ceil(2.5) = 3, tie by key
    assert select_top_fraction(scores, 0.01) == ["b"]
    assert select_top_fraction(scores, 1.0) == ["b", "c", "d", "e", "a"]
    with pytest.raises(ValueError):
        select_top_fraction(scores, 0.0)
