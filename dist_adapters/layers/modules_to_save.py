"""modules_to_save: a trainable full copy of a module (a classifier head, an lm_head...).

The original stays frozen in ``original_module``; each adapter owns a deep copy in
``modules_to_save[<adapter>]`` (peft's names). Forward runs the active copy, or the original when
adapters are disabled. The copy is its own leaf subtree, read only through its own forward
(rule 1 of docs/architecture.md), so an engine can shard it as a unit.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

from torch import nn


class ModulesToSave(nn.Module):
    adapter_module_names = ("modules_to_save",)

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.adapters_disabled = False
        self.merged_adapters: list[str] = []  # always empty: a copy has nothing to merge

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_parameters(self, name: str) -> Iterable[nn.Parameter]:
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].parameters()

    def set_adapter(self, names: list[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"modules_to_save can run one adapter at a time, got {present}")
        for name, module in self.modules_to_save.items():
            for p in module.parameters():
                p.requires_grad_(name in present)
        self.active_adapters = present

    def merge(self, names: Optional[list[str]] = None) -> None:
        pass

    def unmerge(self) -> None:
        pass

    def _current(self) -> nn.Module:
        if self.adapters_disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def unloaded(self, merge: bool) -> nn.Module:
        """Merging keeps the trained copy; unloading without merge restores the original."""
        return self._current() if merge else self.original_module

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)
