"""The default process group as the library's collective code sees it: joined or not, this
rank, a barrier. Works unchanged in a single process (no group: rank 0, barrier a no-op)."""

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
