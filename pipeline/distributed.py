"""Which process of a distributed run this is, and when its ranks have all finished.

A stage launched on N processes (Lightning's own launcher, torchrun or srun) runs its whole
script N times. The rule every stage follows, through `pipeline.artifacts.atomic_dir` and
`PhaseOutputs.publish`: only global rank 0 writes outputs, and only after every rank has
finished its part. A rank that fails never reaches that point; its launcher then stops the
others (Lightning and torchrun stop all workers when one exits non-zero; srun with
`--kill-on-bad-exit=1`), so rank 0 exits non-zero without touching the previous output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch.distributed as dist

# Before a process group is up, where launchers put the rank (Lightning reads the same keys).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID")


def is_distributed() -> bool:
    """A process group is up (Lightning starts it at the first `fit`) with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    """This process's global rank: the process group's once it is up; before that Lightning's
    `rank_zero_only.rank` if a trainer has set it, else the launcher's environment. (Lightning
    is not imported here: every stage imports this module, most never train, and the import
    costs seconds.)"""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:
        return int(getattr(rank_zero.rank_zero_only, "rank", 0) or 0)
    return next((int(os.environ[key]) for key in RANK_VARIABLES if os.environ.get(key)), 0)


def wait_for_all_ranks() -> None:
    """Block until every rank gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def union_over_ranks(names: Iterable[str]) -> list[str]:
    """The sorted union of every rank's `names` (each rank's own names in a single process):
    ranks that hold different metric groups must sync the same ones, in the same order."""
    local = sorted(set(names))
    if not is_distributed():
        return local
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return sorted({name for part in gathered for name in part or []})
