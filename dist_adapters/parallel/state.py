"""Collective helpers for state dicts and saves: every rank enters, rank 0 writes (shard rule 4).
Work without a process group (one process) as well."""

from __future__ import annotations

import torch


def is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()
