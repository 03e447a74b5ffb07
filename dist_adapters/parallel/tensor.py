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
  (``tp_linear``): none / all-reduce of the gradient of the rank-r activation.
- rowwise base (``RowwiseParallel``): all-reduce of the output / none. Its lora_A: all-reduce of
  the rank-r partial products / none.
- vocab-parallel embedding (``RowwiseParallel`` on ``nn.Embedding``): each rank looks up the
  tokens of its vocab slice, zeros elsewhere, then all-reduce / none.
- lm_head (``ColwiseParallel(output_layouts=Replicate())``): all-gather of the logits / split.

Trainable-token rows (``TokenRows``, k x d) stay whole on every rank (``Replicate``): they
overwrite the positions of their tokens after the vocab-parallel all-reduce, so no rank needs
another rank's vocab slice, and nothing V x d is ever gathered. Their gradients are complete on
every rank (replicated compute), so replicas stay equal without a collective.

The adapter leaves compute with their DTensor weights through TP subclasses that ``parallelize``
swaps in (``tp_leaves.py``: ``TPLoraFactor``, ``TPEmbeddingFactor``, ``TPTokenRows``, and DoRA's
``TPMagnitude`` / ``TPDoraLinear``; the way ``fully_shard`` swaps
in its FSDP classes), so the layers themselves know nothing of DTensor.

``grad_norm`` is the norm over DTensor and plain gradients (torch's ``clip_grad_norm_`` refuses
the mix). Recipe strategies: ``tp`` (``TPEngine``: every rank one TP slice of one model) and
``fsdp2_tp`` (2-D mesh dp x tp, ``mesh_2d``: TP inside each dp group, FSDP2 across them; composed
in ``strategies.py``).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..layers.lora import LoraEmbedding, LoraLinear
from ..layers.registry import ADAPTER_LEAF_TYPES
from ..layers.tokens import TiedTokensHead, TrainableTokensLayer
from ..names import clean_name
from .engine import EngineConfig, MakeOptimizer, ShardedEngine
from .tp_leaves import TPDoraLinear, _is_dtensor, swap_in_tp_leaves

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
    return Replicate() if spec == "replicate" else Shard(spec)


def _base_style(style: str, module: nn.Module):
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
        if style is None or isinstance(module, (nn.ModuleDict, ADAPTER_LEAF_TYPES)):
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
            _place_dora(name, module, style, mesh)
            a_spec, b_spec = _FACTOR_PLACEMENTS[style]
            for factor in module.lora_A.values():
                _distribute(factor, mesh, _placement(a_spec))
            for factor in module.lora_B.values():
                _distribute(factor, mesh, _placement(b_spec))
    _retie(ties)
    # every other trainable tensor (token rows, embedding LoRA, LoRA outside the plan) is replicated
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and not _is_dtensor(p):
                module.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, mesh, [_placement("replicate")]),
                                                              requires_grad=True))
    swap_in_tp_leaves(model)
    return model


def adopt(model: nn.Module) -> nn.Module:
    """For a model transformers sharded itself (``from_pretrained(..., distributed_config=
    DistributedConfig(tp_size=...))`` or ``tp_plan="auto"``), adapters injected afterwards: give
    every trainable tensor the placement ``parallelize`` gives it, read from its base weight's
    placement on transformers' mesh (``Shard(0)``: column-parallel, ``Shard(1)``: row-parallel).
    transformers' styles, like torch's, hand the layer plain local tensors, so the TP leaves and
    their collectives (``tp_linear``) are the same. Returns ``model``."""
    from torch.distributed.tensor import distribute_tensor

    _check_trainable(model)
    meshes = []
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        weight = module.base_layer.weight
        if not _is_dtensor(weight):
            continue
        placement = weight.placements[-1]
        style = {Shard(0): "colwise", Shard(1): "rowwise"}.get(placement, "replicate")
        _place_dora(type(module.base_layer).__name__, module, style, weight.device_mesh)
        a_spec, b_spec = _FACTOR_PLACEMENTS.get(style, ("replicate", "replicate"))
        for factor in module.lora_A.values():
            _distribute(factor, weight.device_mesh, _placement(a_spec))
        for factor in module.lora_B.values():
            _distribute(factor, weight.device_mesh, _placement(b_spec))
        meshes.append(weight.device_mesh)
    if not meshes:
        raise ValueError("the model holds no layer tensor-parallel sharded by transformers to adapt "
                         "(load it with from_pretrained(..., distributed_config=DistributedConfig(tp_size=N)))")
    for module in model.modules():  # the rest (LoRA outside the plan) is replicated, as in parallelize
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and not _is_dtensor(p):
                value = distribute_tensor(p.data, meshes[0], [_placement("replicate")])
                module.register_parameter(pname, nn.Parameter(value, requires_grad=True))
    swap_in_tp_leaves(model)
    return model


def _place_dora(name: str, layer: LoraLinear, style: str, mesh) -> None:
    """DoRA over a column- or row-parallel base: the magnitude follows the output rows (Shard(0)
    under colwise, whole under rowwise) and the layer becomes a ``TPDoraLinear``."""
    if not len(layer.lora_magnitude_vector):
        return
    if style not in ("colwise", "rowwise"):
        raise NotImplementedError(f"tensor parallel: {name} is a DoRA adapter over a {style!r} base; DoRA under tp "
                                  "runs over column- and row-parallel linears only")
    for magnitude in layer.lora_magnitude_vector.values():
        _distribute(magnitude, mesh, Shard(0) if style == "colwise" else Replicate())
    layer.__class__ = TPDoraLinear
    layer.row_parallel = style == "rowwise"


def _check_trainable(model: nn.Module) -> None:
    """Only adapter leaves may train under tp: a trainable full copy (modules_to_save) or a
    trainable bias would be sharded by the base's style and saved, merged and clipped as no
    adapter tensor is; refused before anything is sharded."""
    for name, module in model.named_modules():
        if len(getattr(module, "lora_magnitude_vector", None) or {}) and not isinstance(module, LoraLinear):
            raise NotImplementedError(f"tensor parallel: {name} is a DoRA adapter over a {type(module).__name__}; "
                                      "DoRA under tp runs over linear layers only")
        if getattr(module, "modules_to_save", None) is not None:
            raise NotImplementedError(f"tensor parallel: {name} is in modules_to_save; a trainable full copy of a "
                                      "sharded layer is not supported under tp (use fsdp2, or leave it out)")
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and not isinstance(module, ADAPTER_LEAF_TYPES):
                raise NotImplementedError(f"tensor parallel: trainable parameter {name}.{pname} belongs to a "
                                          f"{type(module).__name__}; only adapter leaves (LoRA factors, token "
                                          "rows) are supported under tp (bias='none', no modules_to_save)")


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


def _retie(ties) -> None:
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

def mesh_2d(dp: int, tp: int, device: torch.device):
    """The (dp, tp) device mesh of ``tp`` and ``fsdp2_tp``: tp ranks are neighbours."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


class TPEngine(ShardedEngine):
    """Strategy ``tp``: all ranks hold one model, each a tp slice; every rank sees the same data."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, dist, config: EngineConfig) -> None:
        mesh = mesh_2d(1, config.tp_size, dist.device)
        parallelize(model.to(dist.device), mesh["tp"])
        super().__init__(model, make_optimizer, dist, config, data_parallel=(0, 1))


class HFTPEngine(ShardedEngine):
    """Strategy ``hf_tp``: the model as transformers sharded it (``DistributedConfig(tp_size=world)``,
    the model's own ``base_model_tp_plan``), its adapters placed by ``adopt``; every rank sees
    the same data, as under ``tp``."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, dist, config: EngineConfig) -> None:
        adopt(model)
        super().__init__(model, make_optimizer, dist, config, data_parallel=(0, 1))


def transformers_loading(config: EngineConfig) -> dict:
    """What ``from_pretrained`` gets so that transformers shards the model itself (``hf_tp``)."""
    from transformers.distributed import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_size=config.tp_size)}

