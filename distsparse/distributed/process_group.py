"""Process-group setup from launcher environment variables; collectives that are no-ops alone.

torchrun and Ray Train set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under
srun without torchrun the SLURM_* variables give the same facts. With one process nothing is
initialized and every collective returns its input, so the trainer has one code path.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "all_reduce", "env_from_variables", "init_process_group", "is_distributed",
           "leave_process_group"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits among the workers."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory."""
        return self.rank == 0


def env_from_variables(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Rank, world size and local rank from torchrun/Ray variables, else SLURM's, else one process."""
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                               ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in environ and world in environ:
            return DistEnv(int(environ[rank]), int(environ[world]), int(environ.get(local, 0)))
    return DistEnv()


def init_process_group(env: DistEnv, device: torch.device) -> bool:
    """Join the default process group (gloo on CPU, NCCL on CUDA) when there are several workers.

    Returns True when this call created the group (and the caller should leave it), False when
    there is one worker or a launcher such as Ray Train already made it.
    """
    if env.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
        return True
    return False


def leave_process_group() -> None:
    """Destroy the default group before the process exits.

    A worker exiting with a live gloo group can abort in a C++ destructor ("terminate called
    without an active exception") while its peers still finish; destroying it first avoids that.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialized process group of more than one worker."""
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a tensor; returns it unchanged in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor
