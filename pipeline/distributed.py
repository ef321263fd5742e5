"""Which process of a distributed run this is, and when its ranks have all finished.

A stage launched on N processes (Lightning's own launcher, torchrun or srun) runs its whole
script N times. The rule every stage follows, through `pipeline.artifacts.atomic_dir` and
`PhaseOutputs.publish`: only global rank 0 writes outputs, and only after every rank has
finished its part. A rank that fails never reaches that point; its launcher then stops the
others (Lightning and torchrun stop all workers when one exits non-zero; srun with
`--kill-on-bad-exit=1`), so rank 0 exits non-zero without touching the previous output.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only


def is_distributed() -> bool:
    """A process group is up (Lightning starts it at the first `fit`) with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    """This process's global rank: the process group's once it is up, before that what the
    launcher's environment says (Lightning keeps `rank_zero_only.rank` from RANK, LOCAL_RANK,
    SLURM_PROCID, and sets it to the global rank when a trainer starts)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    return global_rank() == 0


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
