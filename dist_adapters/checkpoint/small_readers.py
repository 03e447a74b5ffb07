"""Sources that are already whole tensors: a PEFT directory, our Megatron per-TP-rank export,
and a single state-dict file (FSDP1 FULL_STATE_DICT ``pytorch_model_fsdp.bin``, a full
``model.safetensors`` / ``pytorch_model.bin`` of a model with adapter layers).

Each has the reader interface of zero_reader / dcp_reader: ``names``, ``shapes``, ``read(name)``,
``world_size``, ``describe()``, ``outer_prefix``.
"""

from __future__ import annotations

import os
from typing import Any

from safetensors import SafetensorError, safe_open

from ..config import CONFIG_NAME
from .allow_list import CheckpointError
from ..names import LEGACY_WEIGHTS_NAME, MEGATRON_SHARDS_NAME, WEIGHTS_NAME


class _Whole:
    outer_prefix = ""
    world_size = 1
    peft_keys = True  # names are peft's file keys already

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors
        self.names = list(tensors)
        self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    def read(self, name: str) -> Any:
        return self.tensors[name].clone()


class PeftDirSource(_Whole):
    format = "peft"

    def __init__(self, path: str) -> None:
        from .peft_format import read_adapter_weights

        self.dir = path
        tensors, self.file = read_adapter_weights(path)
        super().__init__(tensors)

    def describe(self) -> dict:
        return {"format": "PEFT adapter directory", "path": self.dir, "world_size": 1, "files": 1}


class MegatronSource(_Whole):
    format = "megatron"

    def __init__(self, path: str) -> None:
        from .megatron_shards import read_megatron_shards

        self.dir = path
        super().__init__(read_megatron_shards(path))
        with open(os.path.join(path, "mp_rank_00", MEGATRON_SHARDS_NAME), encoding="utf-8") as fh:
            import json

            self.world_size = int(json.load(fh)["tp_size"])

    def describe(self) -> dict:
        return {"format": "Megatron TP shards (mp_rank_XX/)", "path": self.dir, "world_size": self.world_size,
                "tp_size": self.world_size, "files": self.world_size}


class FileSource:
    """One state-dict file, read lazily: safetensors by key, torch files memory-mapped."""

    format = "file"
    outer_prefix = ""
    world_size = 1

    def __init__(self, path: str) -> None:
        self.dir = path
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, "pt") as fh:
                    self.names = list(fh.keys())
                    self.shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in self.names}
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
            self._data = None
        else:
            import torch

            from .safe_load import load_torch

            data = load_torch(path)
            for key in ("module", "model", "state_dict"):  # common wrappers around a state dict
                if isinstance(data, dict) and isinstance(data.get(key), dict):
                    data = data[key]
                    break
            if not isinstance(data, dict):
                raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors)")
            self._data = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
            self.names = list(self._data)
            self.shapes = {k: tuple(v.shape) for k, v in self._data.items()}

    def read(self, name: str) -> Any:
        if self._data is not None:
            return self._data[name].clone()
        with safe_open(self.dir, "pt") as fh:
            return fh.get_tensor(name)

    def describe(self) -> dict:
        return {"format": "single state-dict file", "path": self.dir, "world_size": 1, "files": 1}


def is_peft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(path, n)) for n in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME))




def is_megatron_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "mp_rank_00", MEGATRON_SHARDS_NAME))
