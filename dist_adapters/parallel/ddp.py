"""Strategy ``ddp``: torch DistributedDataParallel over the adapter parameters.

Collectives: DDP all-reduces (averages) gradients of the trainable parameters in buckets during
backward; the frozen base is never reduced. Gradient accumulation skips that all-reduce with
``no_sync`` on every micro step but the last. At construction DDP broadcasts rank 0's
parameters and buffers, so every rank starts from the same adapter. Parameters stay whole on
every rank, so no access handler is needed (the plain one serves).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Sequence

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .engine import Engine, EngineConfig, MakeOptimizer


class DDPEngine(Engine):
    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, dist, config: EngineConfig,
                 ignored: Sequence[nn.Parameter] = ()) -> None:
        """``ignored``: parameters another part of the strategy reduces (expert parallel's
        experts): DDP neither broadcasts nor all-reduces them."""
        model = model.to(dist.device)
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        if ignored:
            skip = {id(p) for p in ignored}
            names = [n for n, p in model.named_parameters() if id(p) in skip]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        super().__init__(DistributedDataParallel(model, device_ids=device_ids), make_optimizer, dist, config)

    def accumulating(self, last_micro_step: bool) -> ContextManager:
        return nullcontext() if last_micro_step else self.model.no_sync()
