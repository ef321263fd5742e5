"""Writing outputs so that nothing already written is lost or half-written.

Every stage output goes into a temporary folder beside its destination and is swapped in only
when complete; an interrupted run leaves the previous output (if any) untouched. Under a
distributed launch only global rank 0 swaps its folder in, once every rank has finished
(pipeline/distributed.py); the other ranks write into private folders that are thrown away.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.distributed import global_rank, wait_for_all_ranks


@contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `target`, on error it is removed.

    Every rank runs the body (it may hold collective operations); rank 0's folder replaces
    `target` after all ranks got through theirs, the other ranks' folders are deleted. A rank
    that fails raises before the barrier, and its launcher then stops the waiting ones.
    """
    target = Path(target)
    rank = global_rank()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp" if rank == 0 else f".{target.name}.rank{rank}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        wait_for_all_ranks()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """JSON file written to a temporary name first, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return json.loads(path.read_text())


def trainable_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters, plus the persistent buffers of every module that has some (e.g. a
    BatchNorm's running statistics): what training changes, and nothing of the frozen encoder."""
    tensors = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for prefix, sub in module.named_modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            for name, buffer in sub.named_buffers(prefix=prefix, recurse=False):
                if name.rsplit(".", 1)[-1] not in sub._non_persistent_buffers_set:
                    tensors[name] = buffer
    return tensors


def save_trainable(module: nn.Module, path: Path) -> None:
    """`trainable_tensors(module)` as safetensors."""
    save_file({n: t.detach().cpu().contiguous() for n, t in trainable_tensors(module).items()}, str(path))


def load_trainable(module: nn.Module, path: Path) -> None:
    """Load tensors saved by `save_trainable`; names and shapes must match exactly."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    tensors = load_file(str(path))
    expected = trainable_tensors(module)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if expected[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, model has {tuple(expected[name].shape)}")
            expected[name].copy_(tensor)


@dataclass(frozen=True)
class PhaseOutputs:
    """Where a phase writes: its folder (a DVC output), and copies of its metrics and curve as
    separate files for `dvc metrics` / `dvc plots` (DVC cannot declare files inside an output)."""

    folder: Path
    metrics: Path | None = None
    plot: Path | None = None

    def publish(self, metrics: Mapping[str, Any], plot_csv: str | None = None) -> None:
        """Write the copies (global rank 0 only: the other ranks' metrics are not the run's)."""
        if global_rank() != 0:
            return
        for path in (self.metrics, self.plot):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        if self.metrics is not None:
            write_json(self.metrics, metrics)
        if self.plot is not None and plot_csv is not None:
            tmp = self.plot.with_name(f".{self.plot.name}.tmp")
            tmp.write_text(plot_csv)
            tmp.replace(self.plot)
