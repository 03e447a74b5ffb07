"""Expert parallel: strategies ``ep`` and ``fsdp2_ep`` (built in ``strategies.py``).

Layout, on a 2-D mesh (dp, ep) of all ranks (dp = world / ep_size; every rank trains on its own
samples): each experts module (transformers' experts interface, ``transformers.integrations.moe``:
``num_experts`` and weights stacked ``[E, ...]``) keeps experts ``k*E/ep .. (k+1)*E/ep - 1`` on
ep rank k, replicated over dp. Its weights and biases, and the LoRA factors of them, become
DTensors placed ``[Replicate(), Shard(d)]``: the weights on dim 0; lora_A ``[E*r, in]`` (expert-
major rows) on dim 0; lora_B, whose PEFT layout ``[out, r*E]`` is rank-major (expert e owns
columns e, e+E, ...), is stored as its view ``[out, r, E]`` sharded on dim 2, which the layer
reads as it is (``layers/experts.py``), and which ``ExpertViewAccess`` below turns back into
``[out, r*E]`` whenever it is read or written whole. The rest of the model belongs to the dense
engine, which ignores the expert parameters: DDP (``ep``) or FSDP2 over all ranks (``fsdp2_ep``).

Collectives, with their backward pairs:
- dispatch (transformers' ``AllToAllEP``, ``transformers/distributed/expert_parallel.py``, which
  runs on gloo): ``all_to_all_single`` of the per-expert token counts (no gradient);
  ``all_to_all_single_autograd`` of the routed tokens to the experts' ranks, whose backward is
  the reverse all-to-all of the token gradients; the same of the expert outputs back to the
  tokens' ranks (backward: the reverse all-to-all). The routing weights are applied on the
  token's own rank, so their gradient stays local. A rank whose experts receive no token still
  runs both exchanges (with empty buffers), so nothing hangs and those gradients are zero.
- ``finish_step``: one ``all_reduce`` (sum) of the expert gradients over the dp group (the
  replicas of the same experts; skipped when dp = 1), then division by the data-parallel size,
  the average DDP and FSDP2 take of the dense gradients. No backward (after backward).
- gradient norm: one ``all_reduce`` (sum) of local squared norms (``engine.sharded_grad_norm``).
- reading whole (save, merge): ``full_tensor``, an all-gather over ep; writing: each rank keeps
  its slice of the full value (no collective).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..control import unwrap
from ..layers.experts import ExpertFactorA, ExpertFactorB, LoraParameter
from ..names import clean_name
from . import access
from .engine import NEUTRAL_DIR, Engine, sharded_grad_norm


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def experts_modules(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(module at the experts' place, the experts module): the place holds the experts module
    itself, or the outermost ``LoraParameter`` of a chain around it (the one that runs it)."""
    held = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraParameter)}
    found = []
    for module in model.modules():
        if id(module) in held:
            continue
        inner = module.target_module if isinstance(module, LoraParameter) else module
        if hasattr(inner, "num_experts") and hasattr(inner, "has_gate") and any(
                p.dim() == 3 for p in inner.parameters(recurse=False)):
            found.append((module, inner))
    return found


@dataclass
class ExpertLayout:
    replica_group: object = None  # ranks holding the same experts (None: no other copy)
    params: list = field(default_factory=list)  # every expert parameter, frozen or trainable

    @torch.no_grad()
    def reduce_gradients(self, data_parallel_size: int) -> None:
        """Sum over the replicas, then the dense engines' average: one all_reduce."""
        grads = [p.grad.to_local() for p in self.params if p.requires_grad and p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.replica_group is not None:
            torch.distributed.all_reduce(flat, group=self.replica_group)
        flat.div_(data_parallel_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def expert_mesh(ep_size: int, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    return init_device_mesh(device.type, (world // ep_size, ep_size, 1), mesh_dim_names=("dp", "ep", "tp"))


def parallelize_experts(model: nn.Module, mesh) -> ExpertLayout:
    """Shard every experts module (and its LoRA) over ``mesh["ep"]`` and route its tokens with
    transformers' all-to-all dispatch; returns the layout (the parameters the dense engine must
    ignore)."""
    layout = ExpertLayout(mesh["dp"].get_group() if mesh["dp"].size() > 1 else None)
    ep = mesh["ep"].size()
    places = experts_modules(model)
    if not places:
        raise ValueError("parallel.strategy ep / fsdp2_ep: the model has no experts module (transformers' "
                         "experts interface); use ddp or fsdp2")
    placed = mesh["dp", "ep"]
    for place, experts in places:
        total = experts.num_experts
        if total % ep:
            raise ValueError(f"{type(experts).__name__} has {total} experts, which parallel.ep_size {ep} does not divide")
        for name, p in list(experts.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == total:
                layout.params.append(_shard(experts, name, 0, placed))
        layout.params += _shard_lora(place, total, placed)
        experts.num_experts = total // ep
        _install_dispatch(place, experts, mesh["ep"], mesh["tp"])
    return layout


def _shard_lora(place: nn.Module, total: int, mesh) -> list[nn.Parameter]:
    """The LoRA factors of the 3-D weights at ``place``, split by expert like the weights."""
    sharded = []
    for layer in place.chain() if isinstance(place, LoraParameter) else []:
        if layer.weight.dim() != 3:
            continue
        for adapter in layer.lora_A:
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            sharded.append(_shard(a, "weight", 0, mesh))
            flat = b.weight.shape
            b.weight = nn.Parameter(b.weight.detach().reshape(flat[0], -1, total), requires_grad=b.weight.requires_grad)
            sharded.append(_shard(b, "weight", 2, mesh, peft_shape=flat))
    return sharded


def adopt_experts(model: nn.Module) -> ExpertLayout:
    """For a model transformers' own expert parallel sharded (``from_pretrained(...,
    distributed_config=DistributedConfig(ep_size=...))``), adapters injected afterwards: the LoRA
    of each experts module is split by expert like its weights, on transformers' ep mesh, and
    the token dispatch (the same ``AllToAllEP``) moves to the LoRA wrapper, so the experts run
    with their LoRA on the tokens it brings. Returns the layout (its LoRA factors)."""
    manager = getattr(model, "_mesh_manager", None)
    if manager is None:
        raise ValueError("the model was not sharded by transformers (no distributed_config)")
    ep_mesh, tp_mesh = manager.get_mesh("ep"), manager.get_mesh("tp")
    if tp_mesh.size() > 1 or torch.distributed.get_world_size() != ep_mesh.size():
        raise NotImplementedError("LoRA on transformers' expert parallel supports ep_size = world size without "
                                  "tp (each expert on one rank); use the ep / fsdp2_ep strategies otherwise")
    layout = ExpertLayout()
    for place, experts in experts_modules(model):
        if not getattr(experts, "_is_expert_parallel", False):
            continue
        total = experts.num_experts * ep_mesh.size()
        layout.params += _shard_lora(place, total, ep_mesh)
        _run_locally(experts)  # in place of transformers' dispatch, which moves to the wrapper
        _install_dispatch(place, experts, ep_mesh, tp_mesh)
    return layout


def _run_locally(experts: nn.Module) -> None:
    """The experts' own forward on their local shards. transformers wraps the experts in an FSDP2
    unit of their own, whose pre-forward hook registers its DTensor parameters again after the
    wrapper's swap; this runs after the hooks (where transformers' dispatch ran)."""
    own_forward = type(experts).forward

    def local_forward(*args, **kwargs):
        with _local_params([experts]):
            return own_forward(experts, *args, **kwargs)

    experts.forward = local_forward


def _shard(module: nn.Module, name: str, dim: int, mesh, peft_shape=None) -> nn.Parameter:
    """``module.name`` as a DTensor on ``mesh`` ((dp, ep) or ep), split on ``dim`` over ep."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    p = getattr(module, name)
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(dim)]
    # every rank built the same full tensor (same seed): each keeps its slice, no communication
    value = distribute_tensor(p.detach(), mesh, placements, src_data_rank=None)
    new = nn.Parameter(value, requires_grad=p.requires_grad)
    if peft_shape is not None:
        _PEFT_SHAPES[id(new)] = (new.shape, torch.Size(peft_shape))
    setattr(module, name, new)
    return new


@contextmanager
def _local_params(modules: list[nn.Module]) -> Iterator[None]:
    """The modules' DTensor parameters as their local shards (differentiable ``to_local``)."""
    swapped = []
    for module in modules:
        for name, p in list(module._parameters.items()):
            if p is not None and _is_dtensor(p):
                module._parameters[name] = p.to_local()
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _install_dispatch(place: nn.Module, experts: nn.Module, ep_mesh, tp_mesh) -> None:
    from transformers.distributed.expert_parallel import AllToAllEP

    implementation = AllToAllEP(experts, ep_mesh, tp_mesh)
    implementation.experts_forward = place.forward  # the experts (with their LoRA) on local expert ids
    holders = [experts] + [m for m in place.modules() if isinstance(m, (ExpertFactorA, ExpertFactorB))]

    def ep_forward(hidden_states, top_k_index, top_k_weights):
        with _local_params(holders):
            return implementation(hidden_states, top_k_index, top_k_weights).to(hidden_states.dtype)

    place.forward = ep_forward


# lora_B parameters of sharded experts: id -> (its [out, r, E] shape, its PEFT shape). An
# attribute set on a DTensor parameter does not survive ``Module.to`` (which swaps the tensor's
# contents, and refuses tensors with weak references), so the mark is kept here.
_PEFT_SHAPES: dict[int, tuple[torch.Size, torch.Size]] = {}


def _peft_shape(p):
    entry = _PEFT_SHAPES.get(id(p))
    return entry[1] if entry is not None and p.shape == entry[0] and _is_dtensor(p) else None


class ExpertViewAccess(access.Access):
    """lora_B of sharded experts, stored as its ``[out, r, E]`` view: read and written whole in
    the PEFT shape ``[out, r*E]``."""

    name = "expert_view"

    def claims_param(self, p) -> bool:
        return _peft_shape(p) is not None

    def full_shape(self, p) -> torch.Size:
        return _peft_shape(p)

    def read_full(self, p):
        return p.full_tensor().reshape(_peft_shape(p))

    @torch.no_grad()
    def write_full(self, p, value) -> None:
        from torch.distributed.tensor import distribute_tensor

        value = value.to(p.device, p.dtype).reshape(p.shape)
        p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local())


access.register(ExpertViewAccess())


class ExpertParallelEngine(Engine):
    """The dense engine (DDP or FSDP2, built over the model with the expert parameters ignored)
    plus the expert layout: expert gradients are reduced before the step, the gradient norm
    counts every tensor once, and the optimizer state is saved whole (``optimizer.pt``, as the
    replicated engines write it, and the engine-neutral ``dcp/``), so it resumes under any
    strategy at any size, and reads any strategy's ``dcp/``."""

    def __init__(self, dense: Engine, layout: ExpertLayout) -> None:
        self.dense, self.layout = dense, layout
        self.dist, self.config, self.model = dense.dist, dense.config, dense.model
        self.data_parallel, self.optimizer = dense.data_parallel, dense.optimizer

    def accumulating(self, last_micro_step: bool):
        return self.dense.accumulating(last_micro_step)

    def backward(self, loss: torch.Tensor) -> None:
        self.dense.backward(loss)

    def grad_norm(self) -> torch.Tensor:
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        replicated = sum((p.grad.double().pow(2).sum() for p in params if not _is_dtensor(p.grad)),
                         torch.zeros((), dtype=torch.float64, device=self.dist.device))
        sharded = sharded_grad_norm([p for p in params if _is_dtensor(p.grad)], self.dist.device).double()
        return (replicated + sharded.pow(2)).sqrt().float()

    def finish_step(self) -> float:
        self.layout.reduce_gradients(self.dp_size)
        return super().finish_step()

    def _ordered(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _named(self) -> list[tuple[str, nn.Parameter]]:
        """(the name get_state_dict gives it, parameter) in the optimizer's order."""
        names = {id(p): clean_name(n) for n, p in unwrap(self.model).named_parameters()}
        return [(names[id(p)], p) for p in self._ordered()]

    def save_optimizer(self, directory: str) -> None:
        """Every rank enters (expert and FSDP2 states are all-gathered); rank 0 writes
        ``optimizer.pt`` (by parameter order: this engine's own resume), and every rank the
        engine-neutral ``dcp/`` from the same whole tensors (DCP keeps one copy of each)."""
        state = {}
        for index, p in enumerate(self._ordered()):
            values = self.optimizer.state.get(p, {})
            state[index] = {key: _whole(values[key], p) for key in sorted(values)}
        groups = self.optimizer.state_dict()["param_groups"]
        if self.dist.is_main:
            torch.save({"state": state, "param_groups": groups}, os.path.join(directory, "optimizer.pt"))
        self._save_neutral(directory, state, groups)

    def _save_neutral(self, directory: str, state: dict, groups: list) -> None:
        """engine.save_neutral_state's layout, as ZeRO writes it (parallel/deepspeed.py): the
        adapter and the optimizer state whole in PEFT shapes under the parameter names (an
        expert lora_B as ``[out, r*E]``, not its ``[out, r, E]`` view), which get_state_dict of
        any other engine asks for; DCP reshards them on load."""
        import torch.distributed.checkpoint as dcp

        named = self._named()
        model_sd = {name: _whole(p.detach(), p) for name, p in named}
        names = [name for name, _ in named]
        optim_sd = {"state": {names[i]: values for i, values in state.items() if values},
                    "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                      "params": [names[i] for i in g["params"]]} for g in groups]}
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, NEUTRAL_DIR))

    def load_optimizer(self, directory: str, neutral: bool = False) -> None:
        """Same strategy and world size: ``optimizer.pt``; else (``neutral``) the neutral
        ``dcp/`` any strategy writes, read whole and placed as this engine holds each tensor."""
        path = os.path.join(directory, "optimizer.pt")
        if not os.path.isfile(path) or (neutral and os.path.isdir(os.path.join(directory, NEUTRAL_DIR))):
            return self._load_neutral(directory)
        saved = torch.load(path, map_location=self.dist.device, weights_only=True)
        params = self._ordered()
        if len(saved["state"]) > len(params):
            raise ValueError(f"{directory}/optimizer.pt holds state of {len(saved['state'])} parameters; "
                             f"this model trains {len(params)}")
        state = {i: {k: _placed(v, params[i]) for k, v in values.items()} for i, values in saved["state"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    def _load_neutral(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        inner = self.optimizer
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            return  # the recipe's other optimizer, plain SGD, has no state
        named = self._named()
        state = {name: {"step": torch.zeros(()), **{k: torch.empty(tuple(access.full_shape(p)))
                                                    for k in ("exp_avg", "exp_avg_sq")}} for name, p in named}
        dcp.load({"optim": {"state": state}}, checkpoint_id=os.path.join(directory, NEUTRAL_DIR))
        placed = {i: {k: _placed(v, p) for k, v in state[name].items()} for i, (name, p) in enumerate(named)}
        self.optimizer.load_state_dict({"state": placed, "param_groups": inner.state_dict()["param_groups"]})


def _whole(value, p):
    """An optimizer state tensor of ``p`` whole, in the PEFT shape (scalars as they are)."""
    if not isinstance(value, torch.Tensor):
        return value
    if _is_dtensor(value):
        value = value.full_tensor()
    if value.dim() and math.prod(value.shape) == math.prod(access.full_shape(p)):
        value = value.reshape(access.full_shape(p))
    return value.detach().cpu().clone()


def _placed(value, p):
    """A whole optimizer state tensor as ``p`` holds it (each rank keeps its slice)."""
    if not (isinstance(value, torch.Tensor) and value.dim() and _is_dtensor(p)):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.reshape(p.shape), p.device_mesh, p.placements, src_data_rank=None)


def transformers_loading(config) -> dict:
    """What ``from_pretrained`` gets so that transformers shards the experts itself (``hf_ep``):
    each expert on one rank (ep_size = world size), the frozen dense weights FSDP2 over all."""
    from transformers.distributed import DistributedConfig

    world = torch.distributed.get_world_size()
    return {"distributed_config": DistributedConfig(fsdp_size=world, ep_size=config.ep_size)}

