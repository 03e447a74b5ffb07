"""FSDP1 and FSDP2 with adapters: wrapping, gathers, and the recipe engines.

FSDP1 (``FullyShardedDataParallel``) flattens each unit's parameters into one flat parameter,
which with ``use_orig_params=False`` must have uniform ``requires_grad``. ``auto_wrap_policy``
therefore puts every adapter leaf (LoRA factors, token rows, modules_to_save copies) in its own
unit and every transformer block in another: block units hold only frozen weights, adapter
units only trainable ones. This works because a leaf's weight is read only in the leaf's own
forward (rule 1, docs/architecture.md), which is where FSDP unshards it.

FSDP2 (``fully_shard``) shards parameters as DTensors per group. ``shard`` makes a group per
transformer block, then the root. FSDP2 needs one original dtype per group ("FSDP expects uniform
original parameter dtype"): over a bf16 base with fp32 adapters, ``shard`` gives each block's
adapter leaves a group of their own (``separate_adapters="auto"`` does this exactly when the
dtypes differ), so the base stays bf16 and the adapters train in fp32.

Collectives: forward all-gathers each unit/group's shards (backward: the same all-gather again
if resharded after forward); backward reduce-scatters gradients, and only trainable parameters
have any, so the bytes reduced per step are the adapter's. Gathers for save, load and merge are
per adapter unit (FSDP1 ``summon_full_params``: ``FSDP1Access`` below) or per tensor (FSDP2's
parameters are DTensors: ``DTensor.full_tensor``, by the DTensor access of ``dtensor.py``),
entered by every rank in the same module order; the frozen model is never gathered to save.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from ..layers.registry import adapter_leaves
from ..names import WRAPPER_CLASSES, clean_name
from . import access
from .engine import EngineConfig, MakeOptimizer, ShardedEngine


def block_classes(model: nn.Module) -> set[type]:
    """Transformer block classes: transformers' ``_no_split_modules``, else *DecoderLayer / *Block."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        found = {type(m) for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))}
    return found


# ----------------------------------------------------------------------------- FSDP1

def auto_wrap_policy(model: nn.Module):
    """FSDP1 policy: adapter leaves in their own units, transformer blocks in theirs."""
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    leaves = {id(m) for m in adapter_leaves(model)}
    return functools.partial(_or_policy, policies=[
        functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in leaves),
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=block_classes(model)),
    ])


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every transformer block (before wrapping with FSDP).
    transformers models use their own switch (their blocks already know how to checkpoint
    themselves with the keyword arguments they receive); other models get torch's wrapper."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing as apply, checkpoint_wrapper)

    blocks = tuple(block_classes(model))
    apply(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
          check_fn=lambda m: isinstance(m, blocks))


def wrap_fsdp1(model: nn.Module, device: torch.device, use_orig_params: bool = False,
               mixed_precision: Optional[torch.dtype] = None, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision

    mp = MixedPrecision(param_dtype=mixed_precision, reduce_dtype=mixed_precision) if mixed_precision else None
    return FSDP(model, auto_wrap_policy=auto_wrap_policy(model), device_id=device,
                use_orig_params=use_orig_params, mixed_precision=mp, **kwargs)


def _fsdp1_units(model: nn.Module):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [(n, m) for n, m in model.named_modules() if isinstance(m, FSDP)]


def fsdp1_root(model: nn.Module) -> nn.Module:
    """The module FSDP1's gathers start from: ``model`` without outer DDP / DeepSpeed wrappers,
    stopping at an FSDP1 root (its unit owns the storage of the weights outside nested units)."""
    while type(model).__name__ in WRAPPER_CLASSES and type(model).__name__ != "FullyShardedDataParallel" \
            and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_fsdp1(model: nn.Module) -> bool:
    return bool(_fsdp1_units(fsdp1_root(model)))


def _lazy_init_root(root: nn.Module) -> None:
    """FSDP1 marks root and nested units on the root's first forward; summoning a nested unit
    before that would make it think it is a root. Initialise the outermost unit first."""
    from torch.distributed.fsdp._runtime_utils import _lazy_init

    outermost = _fsdp1_units(root)[0][1]
    _lazy_init(outermost, outermost)


@contextmanager
def fsdp1_full_params(root: nn.Module, module: nn.Module, writeback: bool = True) -> Iterator[None]:
    """Full parameters of ``module``: summon its nearest enclosing FSDP1 unit (and the units nested
    in it). Collective over that unit's process group: every rank must enter."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    _lazy_init_root(root)
    path = next(n for n, m in root.named_modules() if m is module)
    owner = max((u for u in _fsdp1_units(root) if path.startswith(u[0] + ".") or u[0] == "" or u[0] == path),
                key=lambda u: len(u[0]))[1]
    with FSDP.summon_full_params(owner, recurse=True, writeback=writeback):
        yield


class FSDP1Access(access.Access):
    """FSDP1 flat parameters: gathers are per unit (``summon_full_params``), never per tensor.

    - ``full_weights(layer)``: summon the nearest unit enclosing ``layer`` (all-gather of that
      unit; with writeback the local shard is updated on exit).
    - ``adapter_params``: each adapter leaf unit is summoned in turn (``recurse=False``); the
      frozen units are never gathered. Tensors outside adapter leaves (biases) live in frozen
      flat parameters and are refused (``base_tensor_refusal``).
    """

    name = "fsdp1"

    def claims_layer(self, layer: nn.Module, model: nn.Module) -> bool:
        return is_fsdp1(model)

    def claims_model(self, model: nn.Module) -> bool:
        return is_fsdp1(model)

    def full_weights(self, layer: nn.Module, model: nn.Module):
        return fsdp1_full_params(fsdp1_root(model), layer, writeback=True)

    def base_tensor_refusal(self, model: nn.Module):
        if is_fsdp1(model):
            return "FSDP1: the biases live in frozen flat parameters; use FSDP2 (parallel.strategy: fsdp2)"
        return None

    def adapter_params(self, model: nn.Module, wanted, writeback: bool):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = fsdp1_root(model)
        _lazy_init_root(root)
        leaves = {id(m) for m in adapter_leaves(root)}
        for name, unit in _fsdp1_units(root):
            if id(unit.module) in leaves:
                with FSDP.summon_full_params(unit, recurse=False, writeback=writeback):
                    for pname, p in unit.module.named_parameters():
                        full_name = clean_name(f"{name}.{pname}")
                        if wanted(full_name):
                            yield full_name, p


access.register(FSDP1Access())


# ----------------------------------------------------------------------------- FSDP2

def _needs_separate_adapters(model: nn.Module) -> bool:
    adapter_ids = {id(p) for leaf in adapter_leaves(model) for p in leaf.parameters()}
    dtypes_adapter = {p.dtype for leaf in adapter_leaves(model) for p in leaf.parameters()}
    dtypes_base = {p.dtype for p in model.parameters() if id(p) not in adapter_ids}
    return bool(dtypes_adapter and dtypes_base and dtypes_adapter != dtypes_base)


def shard(model: nn.Module, mesh=None, separate_adapters="auto", **fully_shard_kwargs) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root; returns ``model``.

    ``separate_adapters``: True puts each block's adapter leaves in a group of their own (needed
    when adapters and base differ in dtype); "auto" does so exactly then.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(kind, (torch.distributed.get_world_size(),))
    separate = _needs_separate_adapters(model) if separate_adapters == "auto" else bool(separate_adapters)
    blocks = tuple(block_classes(model))
    for block in [m for m in model.modules() if isinstance(m, blocks)]:
        if separate:
            leaves = adapter_leaves(block)
            if leaves:
                fully_shard(leaves, mesh=mesh, **fully_shard_kwargs)
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    if separate:
        sharded = {id(m) for m in model.modules() if type(m).__name__.startswith("FSDP")}
        rest = [m for m in adapter_leaves(model) if id(m) not in sharded]
        if rest:
            fully_shard(rest, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


# ----------------------------------------------------------------------------- recipe engines

class FSDP1Engine(ShardedEngine):
    """Strategy ``fsdp1``: ``wrap_fsdp1`` (adapter leaves in their own units); accumulation skips
    the gradient reduce-scatter with ``no_sync`` until the last micro step."""

    def __init__(self, model, make_optimizer: MakeOptimizer, dist, config: EngineConfig) -> None:
        if config.activation_checkpointing:
            apply_activation_checkpointing(model)
        wrapped = wrap_fsdp1(model.to(dist.device), dist.device, use_orig_params=config.use_orig_params,
                             mixed_precision=config.mixed_precision)
        super().__init__(wrapped, make_optimizer, dist, config)

    def accumulating(self, last_micro_step: bool):
        from contextlib import nullcontext

        return nullcontext() if last_micro_step else self.model.no_sync()


class FSDP2Engine(ShardedEngine):
    """Strategy ``fsdp2`` (and the FSDP2 half of ``fsdp2_tp``, over ``mesh``): ``shard``;
    accumulation turns the gradient reduce-scatter off until the last micro step."""

    def __init__(self, model, make_optimizer: MakeOptimizer, dist, config: EngineConfig, mesh=None,
                 data_parallel=None, ignored_params=None) -> None:
        """``ignored_params``: left as they are (expert parallel's experts, which it reduces)."""
        if config.activation_checkpointing:
            apply_activation_checkpointing(model)
        kwargs = {"mesh": mesh}
        if ignored_params:
            kwargs["ignored_params"] = ignored_params
        if config.mixed_precision:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=config.mixed_precision,
                                                       reduce_dtype=config.mixed_precision)
        super().__init__(shard(model.to(dist.device), **kwargs), make_optimizer, dist, config, data_parallel)

    def accumulating(self, last_micro_step: bool):
        from contextlib import nullcontext

        self.model.set_requires_gradient_sync(last_micro_step)
        return nullcontext()
