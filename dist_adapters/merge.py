"""Fold adapters into base weights and back: ``da.merge``, ``da.unmerge``, ``da.unload``.

Every read or write of a full base weight goes through the engine access's gather context,
``parallel.access.full_weights`` (rule 3 of docs/architecture.md), so the same calls work under
every engine. Deltas are computed in fp32 and added in the base weight's dtype; unmerge subtracts
the same fp32 delta, which restores an fp32 base to rounding (a bf16 base loses the low bits of
the sum: merge such a model for export, not to keep training).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .control import adapter_configs, adapter_layers, unwrap
from .parallel.access import full_weights


def merge(model: nn.Module, adapter_names: Optional[list[str]] = None) -> nn.Module:
    """Add the active adapters (or ``adapter_names``) into the base weights; forward then skips them."""
    for _, layer in adapter_layers(model):
        with full_weights(layer, model):
            layer.merge(adapter_names)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the base weights."""
    for _, layer in adapter_layers(model):
        with full_weights(layer, model):
            layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by a plain module and forget the adapters.

    ``merge=True``: LoRA merged into the base, modules_to_save replaced by the trained copy.
    ``merge=False``: the original base modules come back unchanged.
    Returns the unwrapped model (the same object, modified in place).
    """
    inner = unwrap(model)
    replaced: list[str] = []
    for name, layer in list(adapter_layers(inner)):
        if any(name.startswith(done + ".") for done in replaced):
            continue  # nested in a layer already unloaded (LoraParameter chains unload as one)
        replaced.append(name)
        with full_weights(layer, model):
            plain = layer.unloaded(merge)
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, plain)
    adapter_configs(inner).clear()
    inner.__dict__.pop("_da_active", None)
    return inner
