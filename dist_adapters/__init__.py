"""dist_adapters: LoRA, trainable tokens and modules_to_save built to run sharded, saved in the
Hugging Face PEFT format. The public API (README, "The Python API"); nothing else is exported here.

The names resolve on first use (PEP 562), so that command-line tools that need only part of
the package (``dist-adapters consolidate`` / ``inspect``) do not pay for importing all of it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "LoraConfig": ".config", "TrainableTokensConfig": ".config", "LoftQConfig": ".config",
    "inject": ".inject",
    "adapter_state_dict": ".checkpoint.peft_format", "save_adapter": ".checkpoint.peft_format",
    "load_adapter": ".checkpoint.peft_format",
    "merge": ".merge", "unmerge": ".merge", "unload": ".merge",
    "disabled": ".control", "set_adapter": ".control",
}

__all__ = [
    "LoraConfig", "TrainableTokensConfig", "LoftQConfig", "inject", "adapter_state_dict",
    "save_adapter", "load_adapter", "merge", "unmerge", "unload", "disabled", "set_adapter",
]


class _Package(types.ModuleType):
    """When ``dist_adapters.inject`` / ``dist_adapters.merge`` is first imported, the import system
    sets the package attribute of that name to the submodule; the public names are the functions
    of the same spelling, so those stay the package attributes."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dist_adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
