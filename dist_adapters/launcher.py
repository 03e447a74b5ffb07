"""Launch command lines and rank discovery.

This module builds the command line of an existing process manager and discovers the rank a
process was given; it never spawns or supervises ranks itself. torchrun (single node,
``--standalone``: rendezvous on a free local port) is here now; multi-node torchrun, deepspeed,
mpirun and srun come with the launcher issue.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """True when a launcher already started this process as one rank of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(nproc_per_node: int, module_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m <module_args>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}", "-m", *module_args]


def init_distributed(timeout_minutes: float = 30, need_group: bool = False) -> DistInfo:
    """Join the process group the launcher prepared (gloo on CPU, nccl on CUDA), or run alone.
    ``need_group``: without a launcher, still make a one-process group (engines such as FSDP and
    torch.distributed.checkpoint need one even at world size 1).

    The timeout bounds every collective: a rank that died makes the others fail within it
    instead of hanging forever.
    """
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if under_launcher() and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    elif need_group and not dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it even for a single process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)
