"""Tensor parallel with PyTorch DTensor for Hugging Face Llama-style models, adapters included.

``parallelize(model, mesh, plan=None)`` shards the frozen base with torch's own parallel styles
and gives every trainable tensor the matching placement, so each rank computes its slice of the
LoRA product with the slice of the base it holds:

| base layer (plan)            | base weight           | lora_A          | lora_B          |
| ---------------------------- | --------------------- | --------------- | --------------- |
| colwise (q, k, v, gate, up)  | Shard(0): out / tp    | Replicate       | Shard(0)        |
| rowwise (o, down)            | Shard(1): in / tp     | Shard(1)        | Replicate       |
| vocab (embed_tokens)         | Shard(0): vocab / tp  | Replicate (LoRA on the embedding, r x V) |
| gather (lm_head)             | Shard(0): vocab / tp  | Replicate       | Shard(0)        |

Collectives (forward / backward pair):
- colwise base (``ColwiseParallel``): none / all-reduce of the input gradient. Its lora_B
  (``layers.lora.tp_linear``): none / all-reduce of the gradient of the rank-r activation.
- rowwise base (``RowwiseParallel``): all-reduce of the output / none. Its lora_A: all-reduce of
  the rank-r partial products / none.
- vocab-parallel embedding (``RowwiseParallel`` on ``nn.Embedding``): each rank looks up the
  tokens of its vocab slice, zeros elsewhere, then all-reduce / none.
- lm_head (``ColwiseParallel(output_layouts=Replicate())``): all-gather of the logits / split.

Trainable-token rows (``TokenRows``, k x d) stay whole on every rank (``Replicate``): they
overwrite the positions of their tokens after the vocab-parallel all-reduce, so no rank needs
another rank's vocab slice, and nothing V x d is ever gathered. Their gradients are complete on
every rank (replicated compute), so replicas stay equal without a collective.

``grad_norm`` is the norm over DTensor and plain gradients (``clip_grad_norm_`` refuses the mix).
Recipe strategies: ``tp`` (every rank one TP slice of one model) and ``fsdp2_tp`` (2-D mesh
dp x tp: FSDP2 over ``dp`` on top of TP over ``tp``).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Optional

import torch
from torch import nn

from .engine import Engine, MakeOptimizer
from .fsdp import FSDP2Engine, _ShardedEngine

# Module-name patterns (fnmatch, matched against the name without adapter wrappers) -> style.
LLAMA_PLAN = {
    "*embed_tokens": "vocab",
    "*.self_attn.q_proj": "colwise", "*.self_attn.k_proj": "colwise", "*.self_attn.v_proj": "colwise",
    "*.self_attn.o_proj": "rowwise",
    "*.mlp.gate_proj": "colwise", "*.mlp.up_proj": "colwise",
    "*.mlp.down_proj": "rowwise",
    "lm_head": "gather",
}

# style -> (placement of lora_A, placement of lora_B) as torch placements, built lazily
_FACTOR_PLACEMENTS = {"colwise": ("replicate", 0), "rowwise": (1, "replicate"), "gather": ("replicate", 0),
                      "vocab": ("replicate", "replicate")}


def _placement(spec):
    from torch.distributed.tensor import Replicate, Shard

    return Replicate() if spec == "replicate" else Shard(spec)


def _base_style(style: str, module: nn.Module):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    if style == "gather":
        return ColwiseParallel(output_layouts=Replicate())
    if style == "vocab":
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"tensor plan style 'vocab' needs an nn.Embedding, got {type(module).__name__}")
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    raise ValueError(f"unknown tensor plan style {style!r}; use colwise, rowwise, gather or vocab")


def _plain_name(name: str) -> str:
    from .state import clean_name

    return clean_name(name).replace(".base_layer", "")


def _check_divisible(name: str, module: nn.Module, style: str, tp: int) -> None:
    weight = module.weight
    dim = 1 if style == "rowwise" else 0
    if weight.shape[dim] % tp:
        raise ValueError(f"tensor parallel: {name}.weight has {weight.shape[dim]} "
                         f"{'input' if dim else 'output'} features, not divisible by the tp size {tp}")


def parallelize(model: nn.Module, mesh=None, plan: Optional[dict] = None) -> nn.Module:
    """Shard ``model`` (adapters already injected) over the 1-D device mesh ``mesh`` (default:
    all ranks) following ``plan`` (default ``LLAMA_PLAN``); every trainable tensor becomes a
    DTensor on ``mesh`` (see the module docstring). Returns ``model``, changed in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    from ..layers.lora import LoraEmbedding, LoraLinear
    from ..layers.tokens import TiedTokensHead, TrainableTokensLayer

    if mesh is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(kind, (torch.distributed.get_world_size(),))
    plan = LLAMA_PLAN if plan is None else plan
    _check_trainable(model)
    tp = mesh.size()
    placed: set[int] = set()
    ties = _tied_weights(model)
    for name, module in list(model.named_modules()):
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(_plain_name(name), pattern)), None)
        if style is None or isinstance(module, (nn.ModuleDict, _adapter_leaf_types())):
            continue
        base = module.base_layer if isinstance(module, (LoraLinear, LoraEmbedding, TrainableTokensLayer,
                                                        TiedTokensHead)) else module
        if isinstance(base, nn.Linear) or isinstance(base, nn.Embedding):
            if id(base) in placed:
                continue
            _check_divisible(name, base, "rowwise" if style == "rowwise" else "colwise", tp)
            parallelize_module(base, mesh, _base_style(style, base))
            placed.add(id(base))
        if isinstance(module, LoraLinear):
            a_spec, b_spec = _FACTOR_PLACEMENTS[style]
            for factor in module.lora_A.values():
                _distribute(factor, mesh, _placement(a_spec))
            for factor in module.lora_B.values():
                _distribute(factor, mesh, _placement(b_spec))
    _retie(model, ties)
    # every other trainable tensor (token rows, embedding LoRA, LoRA outside the plan) is replicated
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and not _is_dtensor(p):
                module.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, mesh, [_placement("replicate")]),
                                                              requires_grad=True))
    return model


def _check_trainable(model: nn.Module) -> None:
    """Only adapter leaves may train under tp: a trainable full copy (modules_to_save) or a
    trainable bias would be sharded by the base's style and saved, merged and clipped as no
    adapter tensor is; refused before anything is sharded."""
    for name, module in model.named_modules():
        if getattr(module, "modules_to_save", None) is not None:
            raise NotImplementedError(f"tensor parallel: {name} is in modules_to_save; a trainable full copy of a "
                                      "sharded layer is not supported under tp (use fsdp2, or leave it out)")
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and not isinstance(module, _adapter_leaf_types()):
                raise NotImplementedError(f"tensor parallel: trainable parameter {name}.{pname} belongs to a "
                                          f"{type(module).__name__}; only adapter leaves (LoRA factors, token "
                                          "rows) are supported under tp (bias='none', no modules_to_save)")


def _adapter_leaf_types() -> tuple:
    from ..layers.lora import EmbeddingFactor, LoraFactor
    from ..layers.tokens import TokenRows

    return (LoraFactor, EmbeddingFactor, TokenRows)


def _is_dtensor(p) -> bool:
    from .state import is_dtensor

    return is_dtensor(p)


def _distribute(factor: nn.Module, mesh, placement) -> None:
    from torch.distributed.tensor import distribute_tensor

    weight = factor.weight
    if _is_dtensor(weight):
        return
    factor.register_parameter("weight", nn.Parameter(distribute_tensor(weight.data, mesh, [placement]),
                                                     requires_grad=weight.requires_grad))


def _tied_weights(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, parameter name) sharing one Parameter (tie_word_embeddings)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, pname))
    return [group for group in owners.values() if len(group) > 1]


def _retie(model: nn.Module, ties) -> None:
    # each tied module was sharded on its own; point all of them at the first one's DTensor (the
    # vocab embedding and the lm_head both hold Shard(0) of the same [V, d] weight)
    for group in ties:
        module, pname = group[0]
        shared = module._parameters[pname]
        for other, other_name in group[1:]:
            other.register_parameter(other_name, shared)


# ----------------------------------------------------------------------------- gradient norm

def grad_norm(parameters) -> torch.Tensor:
    """2-norm of the gradients of ``parameters``: DTensor gradients (any mesh, sharded or
    replicated) contribute their global norm (``full_tensor`` of the local norms: an all-reduce),
    plain gradients their local one. Every rank gets the same value."""
    total = torch.zeros((), dtype=torch.float64)
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        norm = torch.linalg.vector_norm(g.float() if g.dtype != torch.float32 else g)
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        total = total + norm.double().cpu() ** 2
    return total.sqrt().float()


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of DTensor and plain gradients."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = grad_norm(parameters)
    if math.isfinite(norm.item()) and norm.item() > max_norm:
        for p in parameters:
            p.grad.mul_(max_norm / (norm.item() + 1e-6))
    return norm


# ----------------------------------------------------------------------------- recipe engines

def _mesh(dp: int, tp: int, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


class TPEngine(_ShardedEngine):
    """Strategy ``tp``: all ranks hold one model, each a tp slice; every rank sees the same data."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, dist, tp_size: int) -> None:
        mesh = _mesh(1, tp_size, dist.device)
        parallelize(model.to(dist.device), mesh["tp"])
        Engine.__init__(self, model, make_optimizer, dist)
        self.data_parallel = (0, 1)

    def grad_norm(self) -> torch.Tensor:
        return grad_norm(self.trainable_parameters())


class FSDP2TPEngine(FSDP2Engine):
    """Strategy ``fsdp2_tp``: mesh (dp, tp); TP inside each dp group, FSDP2 across dp groups."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, dist, tp_size: int,
                 activation_checkpointing: bool = False, mixed_precision=None) -> None:
        dp = dist.world_size // tp_size
        mesh = _mesh(dp, tp_size, dist.device)
        parallelize(model.to(dist.device), mesh["tp"])
        super().__init__(model, make_optimizer, dist, activation_checkpointing=activation_checkpointing,
                         mixed_precision=mixed_precision, mesh=mesh["dp"])
        self.data_parallel = (mesh.get_local_rank("dp"), dp)

    def grad_norm(self) -> torch.Tensor:
        return grad_norm(self.trainable_parameters())


def setup_tp(model, make_optimizer, dist, cfg: dict, accumulation: int) -> Engine:
    return TPEngine(model, make_optimizer, dist, tp_size=cfg["parallel"]["tp_size"])


def setup_fsdp2_tp(model, make_optimizer, dist, cfg: dict, accumulation: int) -> Engine:
    from .fsdp import _dtype

    parallel = cfg["parallel"]
    return FSDP2TPEngine(model, make_optimizer, dist, tp_size=parallel["tp_size"],
                         activation_checkpointing=parallel["activation_checkpointing"],
                         mixed_precision=_dtype(parallel["mixed_precision"]))
