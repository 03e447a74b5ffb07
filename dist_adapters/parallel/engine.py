"""What the recipe needs from a parallel strategy, and the single-process strategy itself.

An ``Engine`` owns the model as the strategy wraps it and the optimizer, and knows how to run a
backward pass (with gradient accumulation), take a step, and save or restore the optimizer in a
training checkpoint. Each strategy is one function in this package, ``setup_<name>(model,
make_optimizer, dist, recipe_config, accumulation_steps) -> Engine``, listed in the recipe's strategy table; the training loop
never asks which strategy it runs.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Engine:
    """Single process: forward, backward, clip, step. Subclasses change what differs."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, dist) -> None:
        self.dist = dist
        self.model = model
        self.optimizer = make_optimizer(self.trainable_parameters())

    # (rank, size) of the data-parallel group: which share of the global batch this rank trains
    # on. None: every rank is its own replica. Tensor-parallel ranks of one replica share data.
    data_parallel: tuple[int, int] | None = None

    @property
    def dp_rank(self) -> int:
        return self.data_parallel[0] if self.data_parallel else self.dist.rank

    @property
    def dp_size(self) -> int:
        return self.data_parallel[1] if self.data_parallel else self.dist.world_size

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def accumulating(self, last_micro_step: bool) -> ContextManager:
        """Context for one micro step's forward+backward; gradient sync may be skipped until the last."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def step(self, max_grad_norm: float | None) -> float:
        """Clip to ``max_grad_norm`` (if set), step, zero the gradients; returns the norm before clipping."""
        norm = self.grad_norm()
        if max_grad_norm and math.isfinite(norm.item()) and norm.item() > max_grad_norm:
            scale = max_grad_norm / (norm.item() + 1e-6)
            for p in self.trainable_parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def save_optimizer(self, directory: str) -> None:
        """Called on every rank; this engine's state is replicated, so rank 0 writes it."""
        if self.dist.is_main:
            torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))

    def load_optimizer(self, directory: str) -> None:
        path = os.path.join(directory, "optimizer.pt")
        state = torch.load(path, map_location=self.dist.device, weights_only=True)
        self.optimizer.load_state_dict(state)


def setup_none(model: nn.Module, make_optimizer: MakeOptimizer, dist, cfg: dict, accumulation: int) -> Engine:
    """Strategy ``none``: one process, the model as it is."""
    return Engine(model.to(dist.device), make_optimizer, dist)
