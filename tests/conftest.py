"""Shared fixtures: the repository root and the team's real images (read-only)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from pipeline.config import compose_params

REPO = Path(__file__).resolve().parents[1]


def smoke_params(*overrides: str) -> dict:
    """The `smoke` preset's parameters with the demo encoder randomly initialised: unit tests run
    no foundation stage, so the architecture stays and the checkpoint goes (weights='random')."""
    params = yaml.safe_load(compose_params(["experiment=smoke", *overrides], REPO / "conf"))
    params["backbone"].update(weights="random", checkpoint=None)
    return params


def find_shared_data() -> Path | None:
    """`$XMODAL_SHARED_DATA`, else `../shared/data` beside the checkout, else /work/shared/data."""
    candidates = [os.environ.get("XMODAL_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "hit_uav" / "images").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = find_shared_data()
    if path is None:
        pytest.skip("real images not found: set XMODAL_SHARED_DATA to the shared/data folder")
    return path


def spawn_ranks(target: Callable[..., None], world: int, *args: object) -> list[int]:
    """Run `target(rank, world, *args)` in `world` spawned processes (gloo tests); their exit codes."""
    context = mp.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    return [process.exitcode for process in processes]


class Interrupt(Exception):
    """Stands in for a killed training run."""


def crash_at_step(monkeypatch: pytest.MonkeyPatch, module_class: type, step: int) -> None:
    """Make `module_class.training_step` raise `Interrupt` at global step `step` (undone by
    `monkeypatch.undo()` or at the end of the test): a run killed mid-epoch after a checkpoint."""
    original = module_class.training_step

    def crash(self, batch, batch_idx):
        if self.global_step == step:
            raise Interrupt("killed")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_class, "training_step", crash)


def record_steps(monkeypatch: pytest.MonkeyPatch, module_class: type) -> list[int]:
    """The global step at every training batch `module_class` runs from now on."""
    steps: list[int] = []
    monkeypatch.setattr(module_class, "on_train_batch_start",
                        lambda self, batch, idx: steps.append(self.global_step), raising=False)
    return steps


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of many small forwards: on 2 shared cores intra-op threading makes them ~10x
    slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
