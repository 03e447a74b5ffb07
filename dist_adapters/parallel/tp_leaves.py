"""The tensor-parallel engine's adapter leaves (part of ``tensor.py``'s engine, split off for
size): subclasses of the layer leaves that compute with their DTensor weights, swapped in by
``tensor.parallelize`` / ``tensor.adopt`` (the way ``fully_shard`` swaps in its FSDP classes),
so the layers themselves know nothing of DTensor. Collectives are named on each class.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..layers.dora import Magnitude
from ..layers.lora import EmbeddingFactor, LoraFactor, LoraLinear
from ..layers.tokens import TokenRows


def _is_dtensor(p) -> bool:
    # the same two lines as dtensor.is_dtensor: engine files do not import each other
    # (docs/architecture.md), and a shared module for one isinstance would hide less than it costs
    return isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor)


def tp_linear(x: torch.Tensor, weight: DTensor, accumulate: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T (+ accumulate)`` for a LoRA factor sharded by ``parallelize``; ``x``,
    ``accumulate`` and the result are plain (local) tensors, as the base layer's.

    - ``Replicate``: every rank has the whole factor; local math, no collective.
    - ``Shard(0)`` (lora_B over a column-parallel base): ``x`` is replicated; the result is this
      rank's slice of the output features. Forward: no collective. Backward: the input gradient
      is a partial sum per rank and is all-reduced (``from_local(Replicate)``'s backward).
    - ``Shard(1)`` (lora_A over a row-parallel base): ``x`` is this rank's slice of the input
      features; the partial products are all-reduced in forward (``Partial -> Replicate``);
      backward: no collective (each rank takes the replicated gradient's slice).
    """
    placement = weight.placements[-1]
    x = x.to(weight.dtype)
    if isinstance(placement, Replicate):
        out = F.linear(x, weight.to_local())
    elif placement == Shard(0):
        out = F.linear(DTensor.from_local(x, weight.device_mesh, [Replicate()], run_check=False), weight).to_local()
    elif placement == Shard(1):
        x = DTensor.from_local(x, weight.device_mesh, [Shard(x.dim() - 1)], run_check=False)
        out = F.linear(x, weight).redistribute(placements=[Replicate()]).to_local()
    else:
        raise NotImplementedError(f"LoRA factor with tensor-parallel placement {weight.placements}")
    return out if accumulate is None else accumulate + out.to(accumulate.dtype)


class TPLoraFactor(LoraFactor):
    """A LoRA factor whose weight is a DTensor (``tp_linear``). ``gram`` (DoRA's A A^T): local
    under ``Replicate``; under ``Shard(1)`` the partial products are all-reduced (no backward:
    the norm is a constant)."""

    def forward(self, x: Optional[torch.Tensor], accumulate: Optional[torch.Tensor] = None,
                gram: bool = False) -> torch.Tensor:
        if gram:
            product = self.weight @ self.weight.T
            return product.full_tensor() if isinstance(product, DTensor) else product
        return tp_linear(x, self.weight, accumulate)


class TPMagnitude(Magnitude):
    """DoRA's magnitude as a DTensor: this rank's rows (``Shard(0)``, column-parallel base) or all
    of them (``Replicate``, row-parallel base, whose output every rank holds whole)."""

    def forward(self, norm: torch.Tensor) -> torch.Tensor:
        return self.weight.to_local() / norm


class TPDoraLinear(LoraLinear):
    """A DoRA layer over a tensor-parallel base: the norm reads this rank's rows of W. Under a
    row-parallel base each rank holds a slice of every row, so the sums of squares are
    all-reduced (forward only: the norm is a constant, no backward); ``W A^T`` is completed by
    lora_A's own all-reduce (``tp_linear``, Shard(1))."""

    row_parallel = False

    def dora_rows(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.to_local() if isinstance(weight, DTensor) else weight

    def dora_complete_squares(self, squares: torch.Tensor) -> torch.Tensor:
        if not self.row_parallel:
            return squares
        weight = self.base_layer.weight
        total = squares.clone()
        torch.distributed.all_reduce(total, group=weight.device_mesh.get_group())
        return total

    def dora_bias(self) -> Optional[torch.Tensor]:
        bias = getattr(self.base_layer, "bias", None)
        return bias.to_local() if isinstance(bias, DTensor) else bias


class TPEmbeddingFactor(EmbeddingFactor):
    """lora_embedding_A replicated on every tp rank: the lookup runs on the local (= whole) copy;
    its gradient is complete on every rank (replicated compute), so no collective runs."""

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.lookup(ids, self.weight.to_local(), *args, **kwargs)


class TPTokenRows(TokenRows):
    """Token rows replicated on every tp rank (no collective, as ``TPEmbeddingFactor``). The
    output of a tensor-parallel base is a view made by DTensor's ``to_local``, which autograd
    forbids changing in place: ``place`` writes into a copy of it (never of the V x d weight)."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, mode: str = "embed", scale=None, bias=None):
        return self.place(x, base_out, self.weight.to_local(), mode, scale, bias)


_TP_LEAVES = ((LoraFactor, TPLoraFactor), (EmbeddingFactor, TPEmbeddingFactor), (TokenRows, TPTokenRows),
              (Magnitude, TPMagnitude))


def swap_in_tp_leaves(model: nn.Module) -> None:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        for plain, tp in _TP_LEAVES:
            if type(module) is plain and _is_dtensor(weight):
                module.__class__ = tp
