"""What the training loop needs from a parallel strategy: the ``Engine`` interface, its typed
configuration, and the two shared bases (replicated: ``Engine``; sharded: ``ShardedEngine``).

An ``Engine`` owns the model as the strategy wraps it and the optimizer, and knows how to run a
backward pass (with gradient accumulation), finish an optimizer step, and save or restore the
optimizer in a training checkpoint. Each strategy is one row of ``strategies.STRATEGIES``, whose
``setup(model, make_optimizer, dist, config) -> Engine`` builds it; the training loop never asks
which strategy it runs.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class EngineConfig:
    """What engines read from a run's configuration (the recipe builds it from its sections)."""

    micro_batch_size: int = 1
    accumulation: int = 1  # micro steps per optimizer step
    max_grad_norm: Optional[float] = None  # None or 0: no clipping
    tp_size: int = 1
    ep_size: int = 1  # expert parallel: ranks the experts of one MoE layer are split over
    use_orig_params: bool = False  # FSDP1
    activation_checkpointing: bool = False
    mixed_precision: Optional[torch.dtype] = None  # FSDP1 / FSDP2 compute and reduce dtype
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON; None: deepspeed.DEFAULT_CONFIGS


class Engine:
    """Replicated parameters (one process, DDP): forward, backward, clip, step."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, dist, config: EngineConfig,
                 data_parallel: Optional[tuple[int, int]] = None) -> None:
        self.dist = dist
        self.config = config
        self.model = model
        # (rank, size) of the data-parallel group: which share of the global batch this rank
        # trains on. None: every rank is its own replica (tensor-parallel ranks share data).
        self.data_parallel = data_parallel
        self.optimizer = make_optimizer(self.trainable_parameters())

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

    def finish_step(self) -> float:
        """After the last micro step's backward: clip to ``config.max_grad_norm`` (if set), step
        the optimizer, zero the gradients; returns the gradient norm before clipping."""
        norm = self.grad_norm()
        limit = self.config.max_grad_norm
        if limit and math.isfinite(norm.item()) and norm.item() > limit:
            scale = limit / (norm.item() + 1e-6)
            for p in self.trainable_parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def save_optimizer(self, directory: str) -> None:
        """Called on every rank: this engine's replicated state (rank 0 writes ``optimizer.pt``)
        and the engine-neutral ``dcp/`` that any strategy resumes from."""
        if self.dist.is_main:
            torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        try:
            save_neutral_state(self.model, self.optimizer, directory)
        except AttributeError as exc:  # the same model on every rank: all ranks skip together
            # bitsandbytes' 8-bit layers list state-dict entries (SCB) that are not attributes,
            # which get_state_dict's name walk cannot follow (tests/test_quantized.py)
            if self.dist.is_main:
                print(f"checkpoint: no engine-neutral dcp/ for this model ({exc}); it resumes under none / ddp "
                      "only", file=sys.stderr)

    def load_optimizer(self, directory: str, neutral: bool = False) -> None:
        """``neutral``: the checkpoint was written by another strategy or world size; read its
        ``dcp/`` then, or its whole ``optimizer.pt`` where it has only that (ep, fsdp2_ep)."""
        path = os.path.join(directory, "optimizer.pt")
        if not os.path.isfile(path) or (neutral and os.path.isdir(os.path.join(directory, NEUTRAL_DIR))):
            return load_neutral_state(self.model, self.optimizer, directory)
        state = torch.load(path, map_location=self.dist.device, weights_only=True)
        self.optimizer.load_state_dict(state)


NEUTRAL_DIR = "dcp"


def save_neutral_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """The engine-neutral layout of a checkpoint's training state: the adapter and the optimizer
    state keyed by parameter names (wrappers stripped: ``model.layers.0.self_attn.q_proj.lora_A.
    default.weight``), as a torch.distributed.checkpoint in ``directory/dcp``. Every rank
    writes its shards (DTensor / FSDP1 flat parameters) or, for replicated tensors, DCP keeps
    one copy. Any strategy at any world size reads it back (``load_neutral_state``; ZeRO
    through ``deepspeed.NeutralState``): DCP reshards on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, NEUTRAL_DIR))


def load_neutral_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = os.path.join(directory, NEUTRAL_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{directory}: no {NEUTRAL_DIR}/ (the engine-neutral state every strategy writes "
                                "since issue 22)")
    opts = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    # strict=False: the frozen base is not in the checkpoint (the adapter also comes from
    # adapter/, loaded with key and shape checks by load_adapter before this)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def sharded_grad_norm(parameters: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    """The global 2-norm of gradients spread over ranks, with one all-reduce (sum) of the local
    sums of squares. A plain gradient is this rank's shard (FSDP1's flat parameters); a DTensor
    gradient contributes its local part once per copy: divided by the number of mesh ranks that
    hold the same part (the sizes of its ``Replicate`` mesh dims), so FSDP2 (``Shard``), tensor
    parallel (``Shard`` or ``Replicate``) and both on a 2-D mesh are counted exactly once."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        copies = 1
        if hasattr(g, "to_local"):
            copies = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            g = g.to_local()
        total += g.double().pow(2).sum() / copies
    torch.distributed.all_reduce(total)
    return total.sqrt().float()


class ShardedEngine(Engine):
    """Sharded parameters (FSDP1, FSDP2, tensor parallel): the gradient norm is collective and
    the optimizer is saved as a torch.distributed.checkpoint (resharded on load)."""

    def grad_norm(self) -> torch.Tensor:
        return sharded_grad_norm(self.trainable_parameters(), self.dist.device)

    def save_optimizer(self, directory: str) -> None:
        """Only the engine-neutral ``dcp/``: it is this engine's own layout too (every rank
        writes its shards; resharded on load)."""
        save_neutral_state(self.model, self.optimizer, directory)

    def load_optimizer(self, directory: str, neutral: bool = False) -> None:
        load_neutral_state(self.model, self.optimizer, directory)
