"""Which adapter layer wraps which base module: the layer-kind dispatch table, and the types
that make up an adapted model (adapter layers, and the leaves that hold trainable tensors).

A factory is ``factory(base_module, config, shape) -> adapter layer``: ``config`` is the
LoraConfig being injected (factories read and may settle ``fan_in_fan_out``), ``shape`` the base
weight's real shape as the engine holding it reports (``inject.py`` asks). The most specific
class in the base's MRO wins. Optional families (bitsandbytes, Megatron-core) register here when
imported (``layers/optional.py`` imports them when a model holds their modules).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

from torch import nn

from .dora import Magnitude
from .experts import ExpertFactorA, ExpertFactorB, WeightFactor
from .lora import AdapterLayer, EmbeddingFactor, LoraEmbedding, LoraFactor, LoraLinear
from .modules_to_save import ModulesToSave
from .tokens import TiedTokensHead, TokenRows

LoraFactory = Callable[[nn.Module, object, tuple], nn.Module]
_LORA_DISPATCH: dict[type, LoraFactory] = {}
_LINEAR_KINDS: set[type] = set()

# Modules of an adapted model that hold adapters (what control / merge / save walk over).
ADAPTER_LAYER_TYPES: tuple[type, ...] = (AdapterLayer, ModulesToSave, TiedTokensHead)
# Leaves that hold trainable adapter tensors, each read only in its own forward (rule 1 of
# docs/architecture.md): what an engine wraps, shards or replicates as a unit.
ADAPTER_LEAF_TYPES: tuple[type, ...] = (LoraFactor, EmbeddingFactor, TokenRows, ExpertFactorA, ExpertFactorB,
                                         WeightFactor, Magnitude)


def register_lora_layer(base_type: type, factory: LoraFactory, linear: bool = False) -> None:
    """Map ``base_type`` (and its subclasses, unless more specific ones are registered) to an
    adapter layer. ``linear=True`` makes the type part of ``"all-linear"``."""
    _LORA_DISPATCH[base_type] = factory
    if linear:
        _LINEAR_KINDS.add(base_type)


# Modules LoRA must not pass over in silence (e.g. fused expert containers with no Linear
# inside, which "all-linear" would skip): module -> reason, or None.
_REFUSALS: list[Callable[[nn.Module], Optional[str]]] = []


def register_refusal(check: Callable[[nn.Module], Optional[str]]) -> None:
    _REFUSALS.append(check)


def refusal_for(module: nn.Module) -> Optional[str]:
    return next((reason for reason in (check(module) for check in _REFUSALS) if reason), None)


def factory_for(module: nn.Module) -> Optional[LoraFactory]:
    for cls in type(module).__mro__:
        if cls in _LORA_DISPATCH:
            return _LORA_DISPATCH[cls]
    return None


def linear_kinds() -> tuple[type, ...]:
    return tuple(_LINEAR_KINDS)


def supported_names() -> str:
    return ", ".join(sorted(c.__name__ for c in _LORA_DISPATCH))


def adapter_leaves(model: nn.Module) -> list[nn.Module]:
    """Every module holding trainable adapter tensors: LoRA factors, token rows, saved copies."""
    copies = {id(c) for m in model.modules() if isinstance(m, ModulesToSave) for c in m.modules_to_save.values()}
    return [m for m in model.modules() if isinstance(m, ADAPTER_LEAF_TYPES) or id(m) in copies]


def _linear_factory(module: nn.Module, config, shape: tuple) -> nn.Module:
    if config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out=True but the target is nn.Linear: using fan_in_fan_out=False")
        config.fan_in_fan_out = False
    return LoraLinear(module, fan_in_fan_out=False, shape=shape)


def _conv1d_factory(module: nn.Module, config, shape: tuple) -> nn.Module:
    if not config.fan_in_fan_out:
        warnings.warn("target is transformers Conv1D (weight [in, out]): using fan_in_fan_out=True")
        config.fan_in_fan_out = True
    return LoraLinear(module, fan_in_fan_out=True, shape=shape)


register_lora_layer(nn.Linear, _linear_factory, linear=True)
register_lora_layer(nn.Embedding, lambda module, config, shape: LoraEmbedding(module, shape=shape))
try:  # transformers is a core dependency; guard anyway so a broken install names the cause
    from transformers.pytorch_utils import Conv1D

    register_lora_layer(Conv1D, _conv1d_factory, linear=True)
except ImportError:  # pragma: no cover
    pass
