"""The optional layer families: LoRA over Megatron-core (``parallel.py``) and bitsandbytes
(``quantized.py``) layers. Each imports its library and registers its layers in
``registry.py`` on import; this module imports them only for a model that holds one of their
modules, so neither library is needed otherwise."""

from __future__ import annotations

from torch import nn


def load_for(model: nn.Module) -> None:
    """Register the optional families ``model``'s modules come from (before target matching)."""
    kinds = {type(m).__module__.split(".")[0] for m in model.modules()}
    if "megatron" in kinds:
        from . import parallel  # noqa: F401
    if "bitsandbytes" in kinds:
        from . import quantized  # noqa: F401
