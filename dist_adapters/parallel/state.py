"""Collective access to adapter parameters, whatever engine holds them (shard rule 4).

``iter_params(model, wanted)`` yields (clean name, parameter) for the parameters whose clean name
``wanted`` accepts, in module order on every rank. Under FSDP1 each adapter leaf unit is
summoned in turn (``summon_full_params``, an all-gather of that unit only); under FSDP2 / DTensor
the caller reads ``read_full(p)`` (``DTensor.full_tensor``: an all-gather of that tensor only;
a Megatron TP shard: an all-gather over its TP group).
Every rank must run the same iteration; the frozen model is never gathered. ``write_full``
writes a full tensor back into the parameter's shard.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter or module name without FSDP1 / checkpoint / torch.compile wrapper segments."""
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def iter_params(model: nn.Module, wanted: Callable[[str], bool], writeback: bool = False
                ) -> Iterator[tuple[str, nn.Parameter]]:
    from ..control import unwrap
    from .fsdp import fsdp1_adapter_params, is_fsdp1

    model = unwrap(model, keep_fsdp_root=True)  # DDP / DeepSpeed add a "module." prefix
    if is_fsdp1(model):
        for name, p in fsdp1_adapter_params(model, writeback=writeback):
            if wanted(name):
                yield name, p
        return
    from .deepspeed import gathered, is_deepspeed_param

    for name, p in model.named_parameters(remove_duplicate=False):
        name = clean_name(name)
        if wanted(name):
            if is_deepspeed_param(p):  # ZeRO-3: all-gather this parameter only, re-partition after
                with gathered([p], modify=writeback):
                    yield name, p
            else:
                yield name, p


def _tp_sharded(p: torch.Tensor):
    """(group, size, rank, dim) for a factor sharded over a Megatron TP group (layers/parallel.py
    sets ``da_tp_group`` and Megatron's ``partition_dim``), else None."""
    group = getattr(p, "da_tp_group", None)
    if group is None:
        return None
    dist = torch.distributed
    size = dist.get_world_size(group) if is_distributed() else 1
    return group, size, (dist.get_rank(group) if is_distributed() else 0), p.partition_dim


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape ``read_full(p)`` returns (DTensor shapes are already full)."""
    tp = _tp_sharded(p)
    if tp is None:
        return p.shape
    shape = list(p.shape)
    shape[tp[3]] *= tp[1]
    return torch.Size(shape)


def read_full(p: torch.Tensor) -> torch.Tensor:
    if is_dtensor(p):
        return p.full_tensor()
    tp = _tp_sharded(p)
    if tp is not None and tp[1] > 1:  # Megatron TP shard: all-gather over the TP group, concat on its dim
        group, size, _, dim = tp
        parts = [torch.empty_like(p.detach()) for _ in range(size)]
        torch.distributed.all_gather(parts, p.detach().contiguous(), group=group)
        return torch.cat(parts, dim=dim)
    return p


@torch.no_grad()
def write_full(p: torch.Tensor, value: torch.Tensor) -> None:
    from .deepspeed import is_deepspeed_param, set_full

    if is_deepspeed_param(p):
        set_full(p, value)
    elif is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        p.copy_(distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements))
    elif _tp_sharded(p) is not None:  # Megatron TP shard: keep this rank's slice of the full tensor
        _, size, tp_rank, dim = _tp_sharded(p)
        p.data.copy_(value.chunk(size, dim=dim)[tp_rank].to(p.device, p.dtype))
    else:
        p.data.copy_(value.to(p.device, p.dtype))
