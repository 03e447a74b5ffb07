"""Access to tensors held as DTensors: FSDP2 (``fully_shard``: ``Shard(0)`` over the data-parallel
mesh) and DTensor tensor parallel (``tensor.py``: ``Shard`` / ``Replicate`` over the tp mesh), or
both on a 2-D mesh. One handler serves both, since the tensor type says everything needed.

- ``read_full``: ``DTensor.full_tensor()``: an all-gather of that tensor over its mesh (backward
  not needed: used under no_grad).
- ``write_full``: ``distribute_tensor`` of the full value with the parameter's own placements
  (each rank keeps its slice; no collective beyond the scatter's own), copied in place.
- ``full_weights(layer)``: each DTensor parameter of ``layer`` is swapped for its full tensor
  (all-gather) and written back into its shards on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from . import access


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


class DTensorAccess(access.Access):
    name = "dtensor"

    def claims_param(self, p) -> bool:
        return is_dtensor(p)

    def claims_layer(self, layer: nn.Module, model: nn.Module) -> bool:
        return any(is_dtensor(p) for p in layer.parameters())

    def read_full(self, p):
        return p.full_tensor()

    @torch.no_grad()
    def write_full(self, p, value) -> None:
        p.copy_(distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements))

    @contextmanager
    def full_weights(self, layer: nn.Module, model: nn.Module) -> Iterator[None]:
        swapped = []
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and is_dtensor(p):
                    module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    swapped.append((module, name, p))
        try:
            yield
        finally:
            for module, name, original in swapped:
                self.write_full(original, module._parameters[name].data)
                module._parameters[name] = original


access.register(DTensorAccess())
