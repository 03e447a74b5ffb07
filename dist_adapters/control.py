"""Runtime control of injected adapters: find them, switch them, turn them off.

The adapter configs of a model live on the (unwrapped) module itself in ``_da_configs``, so an
engine wrapper (DDP, DeepSpeedEngine, ...) can be handed to any public function.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .layers.registry import ADAPTER_LAYER_TYPES
from .names import ENGINE_PACKAGES, WRAPPER_ATTRIBUTES, WRAPPER_CLASSES


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside engine wrappers that hold it in ``.module`` (``names.WRAPPER_CLASSES``),
    ``torch.compile``'s and activation checkpointing's wrappers (``names.WRAPPER_ATTRIBUTES``).
    Engines that need their wrapper for a gather find it themselves (``parallel/access.py``)."""
    while True:
        kind = type(model).__name__
        attribute = "module" if kind in WRAPPER_CLASSES else WRAPPER_ATTRIBUTES.get(kind)
        inner = getattr(model, attribute, None) if attribute else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_class(model: nn.Module) -> type:
    """The class the user's model was built as: FSDP2 turns ``Qwen3ForCausalLM`` into a generated
    ``FSDPQwen3ForCausalLM``, which no model directory can be loaded with."""
    for cls in type(unwrap(model)).__mro__:
        if not cls.__module__.startswith(ENGINE_PACKAGES):
            return cls
    return type(unwrap(model))


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every adapter layer, names relative to the unwrapped model."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, ADAPTER_LAYER_TYPES):
            yield name, module


def adapter_configs(model: nn.Module) -> dict:
    return unwrap(model).__dict__.setdefault("_da_configs", {})


def get_config(model: nn.Module, adapter_name: str = "default"):
    configs = adapter_configs(model)
    if adapter_name not in configs:
        known = sorted(configs) or "none; call da.inject or da.load_adapter first"
        raise KeyError(f"no adapter named {adapter_name!r} on this model (adapters: {known})")
    return configs[adapter_name]


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the one that runs and trains; the others stay, frozen and idle."""
    get_config(model, adapter_name)  # raises with the list of names
    for _, layer in adapter_layers(model):
        layer.set_adapter([adapter_name])
    unwrap(model).__dict__["_da_active"] = adapter_name


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Forward without any adapter (merged adapters are unmerged first), restored on exit."""
    layers = [layer for _, layer in adapter_layers(model)]
    before = [layer.adapters_disabled for layer in layers]
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.adapters_disabled = was
