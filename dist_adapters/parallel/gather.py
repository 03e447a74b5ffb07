"""The one gather context for code that reads or writes full base weights (shard rule 3).

Merge, unmerge, weight-dependent initialisations and trainable-token copies run inside
``full_weights(layer, root)``: there ``layer``'s parameters (base weight and adapter factors) are
full, ordinary tensors, and in-place writes to them reach the engine's own storage on exit.

- plain module: nothing to do.
- FSDP1: ``summon_full_params(writeback=True)`` of the nearest FSDP unit enclosing ``layer``
  (all-gather of that unit; the local shard is updated on exit).
- DTensor (FSDP2, tensor parallel): each DTensor parameter of ``layer`` is swapped for its full
  tensor (``full_tensor``: all-gather) and written back into its shards on exit.
- DeepSpeed ZeRO-3: ``GatheredParameters(modifier_rank=0)`` over ``layer``'s parameters (rank 0's
  writes are broadcast and re-partitioned on exit).
Every rank must enter for the same layers in the same order. Other engines register a handler
with ``register_gather``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Optional

from torch import nn

_HANDLERS: list[tuple[Callable[[nn.Module, nn.Module], bool], Callable[[nn.Module, nn.Module], ContextManager]]] = []


def register_gather(predicate: Callable[[nn.Module, nn.Module], bool],
                    context: Callable[[nn.Module, nn.Module], ContextManager]) -> None:
    """``predicate(layer, root)`` claims a layer; ``context(layer, root)`` makes it full."""
    _HANDLERS.insert(0, (predicate, context))


@contextmanager
def _dtensor_full(layer: nn.Module, root: nn.Module) -> Iterator[None]:
    from .state import is_dtensor, write_full

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
            write_full(original, module._parameters[name].data)
            module._parameters[name] = original


def _has_dtensor(layer: nn.Module, root: nn.Module) -> bool:
    from .state import is_dtensor

    return any(is_dtensor(p) for p in layer.parameters())


def _is_fsdp1(layer: nn.Module, root: nn.Module) -> bool:
    from .fsdp import is_fsdp1

    return root is not None and is_fsdp1(root)


def _fsdp1_full(layer: nn.Module, root: nn.Module):
    from .fsdp import fsdp1_full_params

    return fsdp1_full_params(root, layer, writeback=True)


def _has_zero3(layer: nn.Module, root: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in layer.parameters())


def _zero3_full(layer: nn.Module, root: nn.Module):
    from .deepspeed import gathered

    return gathered(list(layer.parameters()), modify=True)


register_gather(_has_dtensor, _dtensor_full)
register_gather(_is_fsdp1, _fsdp1_full)
register_gather(_has_zero3, _zero3_full)


@contextmanager
def full_weights(layer: nn.Module, root: Optional[nn.Module] = None) -> Iterator[nn.Module]:
    for predicate, context in _HANDLERS:
        if predicate(layer, root):
            with context(layer, root):
                yield layer
            return
    yield layer  # a plain module: its weights are already full
