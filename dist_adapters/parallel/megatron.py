"""The engine part of LoRA over Megatron-core tensor-parallel layers (``layers/parallel.py``):
how their sharded factors are read, written and saved whole.

A sharded factor carries ``da_tp_group`` (the TP process group it is split over, set by the
layer) and Megatron's own ``partition_dim``. Megatron itself is not imported here: the
collectives are torch.distributed's over that group.

- ``read_full``: all-gather over the TP group, concatenated on ``partition_dim``.
- ``write_full``: keep this rank's slice of the full value (no collective).
- ``full_weights(layer)``: nothing to gather: each rank's ``B @ A`` already has the shape of its
  local base weight, so merge / unmerge are local (and no other engine's gather may claim them).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..process_group import is_distributed
from . import access


class TPShard(NamedTuple):
    group: object
    size: int
    rank: int
    dim: int


def tp_shard(p: torch.Tensor) -> Optional[TPShard]:
    """Where a factor sharded over a Megatron TP group sits, else None."""
    group = getattr(p, "da_tp_group", None)
    if group is None:
        return None
    dist = torch.distributed
    size = dist.get_world_size(group) if is_distributed() else 1
    return TPShard(group, size, dist.get_rank(group) if is_distributed() else 0, int(p.partition_dim))


class MegatronAccess(access.Access):
    name = "megatron"

    def claims_param(self, p) -> bool:
        return tp_shard(p) is not None

    def claims_layer(self, layer: nn.Module, model: nn.Module) -> bool:
        return any(tp_shard(p) is not None for p in layer.parameters())

    def full_shape(self, p) -> torch.Size:
        shard = tp_shard(p)
        shape = list(p.shape)
        shape[shard.dim] *= shard.size
        return torch.Size(shape)

    def read_full(self, p):
        shard = tp_shard(p)
        if shard.size == 1:
            return p
        parts = [torch.empty_like(p.detach()) for _ in range(shard.size)]
        torch.distributed.all_gather(parts, p.detach().contiguous(), group=shard.group)
        return torch.cat(parts, dim=shard.dim)

    @torch.no_grad()
    def write_full(self, p, value) -> None:
        shard = tp_shard(p)
        p.data.copy_(value.chunk(shard.size, dim=shard.dim)[shard.rank].to(p.device, p.dtype))

    def full_weights(self, layer: nn.Module, model: nn.Module):
        return nullcontext()


access.register(MegatronAccess())
