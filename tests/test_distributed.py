"""Rank-safe outputs: under 2 gloo processes only rank 0 writes, after both ranks are done; a
failing rank leaves the previous output in place and makes rank 0 fail too."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.artifacts import PhaseOutputs, atomic_dir


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
    context = mp.get_context("spawn")
    processes = [context.Process(target=_write_as_rank, args=(rank, 2, str(tmp_path / "init"), str(tmp_path),
                                                              fail_rank)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    return [process.exitcode for process in processes]


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
