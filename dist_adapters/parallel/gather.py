"""The one gather context for code that reads or writes full base weights (shard rule 3).

Merge, unmerge, weight-dependent initialisations and trainable-token copies call
``full_weights(layer)``. Inside it ``layer.base_layer.weight`` and the adapter weights are full,
ordinary tensors, and in-place writes to them reach the engine's own storage.

Engines register a handler: ``register_gather(predicate, context_factory)``. A module that no
handler claims is a plain module and needs nothing. A module that holds sharded parameters no
handler knows is refused with the engine's name, rather than merged into a shard.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

from torch import nn

_HANDLERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], ContextManager]]] = []


def register_gather(predicate: Callable[[nn.Module], bool],
                    context: Callable[[nn.Module], ContextManager]) -> None:
    _HANDLERS.insert(0, (predicate, context))


def _sharding_engine(module: nn.Module) -> str | None:
    for p in module.parameters():
        if hasattr(p, "ds_shape") or hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3"
        if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            return "DTensor (FSDP2 / tensor parallel)"
        if type(p).__name__ == "FlatParameter":
            return "FSDP1"
    return None


@contextmanager
def full_weights(module: nn.Module) -> Iterator[nn.Module]:
    for predicate, context in _HANDLERS:
        if predicate(module):
            with context(module):
                yield module
            return
    engine = _sharding_engine(module)
    if engine is not None:
        raise NotImplementedError(
            f"{type(module).__name__} holds {engine} sharded parameters and no gather handler for that "
            "engine is registered; use the engine helpers in dist_adapters.parallel"
        )
    with nullcontext():
        yield module
