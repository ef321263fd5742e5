"""Which process of a distributed run this is, how many there are, how to start or join them
(`launch_ranks`, for the stages that do not train), what they gather, and when they have all
finished.

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
from collections.abc import Iterable, Mapping
from typing import Any

import torch
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
    return sorted({name for part in gather_objects(sorted(set(names))) for name in part})


def gather_objects(local: object) -> list[object]:
    """Every rank's `local` (picklable), in rank order; `[local]` in a single process."""
    if not is_distributed():
        return [local]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def devices_of_ranks(device: torch.device) -> dict[str, list[int]]:
    """`{device name: [global ranks on it]}` over all ranks (e.g. {"NVIDIA H100 80GB HBM3": [0..7]})."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    ranks: dict[str, list[int]] = {}
    for rank, each in enumerate(gather_objects(name)):
        ranks.setdefault(str(each), []).append(rank)
    return ranks


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    """Ranks a trainer config will use (devices x nodes); -1/"auto" devices count all GPUs."""
    devices = trainer_cfg.get("devices", 1)
    if devices in (-1, "auto"):
        devices = max(1, torch.cuda.device_count()) if trainer_cfg.get("accelerator") != "cpu" else 1
    elif isinstance(devices, (list, tuple)):
        devices = len(devices)
    return int(devices) * int(trainer_cfg.get("num_nodes", 1))


def launch_ranks(trainer_cfg: Mapping[str, Any]) -> torch.device:
    """Join (torchrun, srun) or start (Lightning Fabric re-runs this command) the processes of
    `trainer_cfg`, for the stages that spread work over ranks without training (evaluation,
    subset scoring): they use the same processes and devices the training stages do. Returns
    this rank's device; a one-device config starts nothing."""
    from lightning.fabric import Fabric  # the training stages' Lightning import, when needed

    distributed = world_size(trainer_cfg) > 1
    fabric = Fabric(accelerator=trainer_cfg.get("accelerator", "auto"), devices=trainer_cfg.get("devices", 1),
                    num_nodes=trainer_cfg.get("num_nodes", 1),
                    strategy=trainer_cfg.get("strategy", "ddp") if distributed else "auto", precision="32-true")
    fabric.launch()
    return fabric.device
