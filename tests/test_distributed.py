"""Under 2 gloo processes: rank-safe outputs (only rank 0 writes, after both ranks are done; a
failing rank leaves the previous output in place and makes rank 0 fail too), and DINO centres
averaged over ranks."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.artifacts import PhaseOutputs, atomic_dir
from pipeline.methods.psst import ErrorWeightedPatchLoss, StepCenteredDINOLoss
from tests.conftest import spawn_ranks


def _write_as_rank(rank: int, world: int, init_file: str, root: str, fail_rank: int | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=8))
    try:
        outputs = PhaseOutputs(Path(root) / "out", metrics=Path(root) / "metrics.json")
        with atomic_dir(outputs.folder) as tmp:
            (tmp / "written_by.txt").write_text(str(rank))
            if rank == fail_rank:
                raise RuntimeError(f"rank {rank} fails")
        outputs.publish({"rank": rank})
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, fail_rank: int | None) -> list[int]:
    return spawn_ranks(_write_as_rank, 2, str(tmp_path / "init"), str(tmp_path), fail_rank)


def test_only_rank_zero_writes_once_every_rank_is_done(tmp_path: Path) -> None:
    assert _run(tmp_path, fail_rank=None) == [0, 0]
    assert (tmp_path / "out" / "written_by.txt").read_text() == "0"
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"rank": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "out"]  # no rank's folder left


def test_a_failing_rank_keeps_the_previous_output_and_fails_rank_zero(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "written_by.txt").write_text("previous run")
    codes = _run(tmp_path, fail_rank=1)
    assert codes[1] != 0 and codes[0] != 0  # rank 0 gives up waiting for rank 1: the stage fails
    assert (tmp_path / "out" / "written_by.txt").read_text() == "previous run"
    assert not (tmp_path / "metrics.json").exists()


def _centre_data() -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 16, generator=g) for _ in range(2)], torch.randn(8, 16, generator=g)


def _centres_as_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """Rank r holds images 2r, 2r+1 of a batch of 4 (both global views, their masked units)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        teacher, units = _centre_data()
        image_loss, patch_loss = StepCenteredDINOLoss(16), ErrorWeightedPatchLoss(16)
        mine = slice(2 * rank, 2 * rank + 2)
        image_loss([t[mine] for t in teacher], [t[mine] for t in teacher])
        mask = torch.ones(2, 1, 2, dtype=torch.bool)  # 2 units per image: units 4r..4r+3 are this rank's
        patch_loss(units[4 * rank: 4 * rank + 4], units[4 * rank: 4 * rank + 4], mask, mask.float() / 2)
        image_loss.step_center()
        patch_loss.step_center()
        torch.save({"image": image_loss.center, "patch": patch_loss.center.value}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_dino_centres_are_averaged_over_ranks(tmp_path: Path) -> None:
    """lightly's `center_mean` all-reduces the batch centre: 2 ranks x 2 images move both centres
    as one process with the 4 images does (and so keep them equal on every rank)."""
    assert spawn_ranks(_centres_as_rank, 2, str(tmp_path / "init"), str(tmp_path / "c")) == [0, 0]
    teacher, units = _centre_data()
    image_loss, patch_loss = StepCenteredDINOLoss(16), ErrorWeightedPatchLoss(16)
    image_loss(teacher, teacher)
    mask = torch.ones(4, 1, 2, dtype=torch.bool)
    patch_loss(units, units, mask, mask.float() / 2)
    image_loss.step_center()
    patch_loss.step_center()
    for rank in range(2):
        centres = torch.load(tmp_path / f"c.{rank}", weights_only=True)
        assert torch.allclose(centres["image"], image_loss.center, atol=1e-7)
        assert torch.allclose(centres["patch"], patch_loss.center.value, atol=1e-7)
