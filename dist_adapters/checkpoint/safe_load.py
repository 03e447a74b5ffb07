"""Reading other programs' checkpoints without running their code (rule 5 of docs/architecture.md).

Two kinds of pickle arrive here:

- torch files (``*.pt``, ``*.bin``; DeepSpeed's model and optimizer states, the tensors inside
  DCP's ``.distcp``): read with ``torch.load(weights_only=True, mmap=True)``. DeepSpeed's files
  also hold a few of DeepSpeed's own objects; those are allow-listed by their exact names and
  rebuilt as inert stand-ins (plain attributes, no methods of DeepSpeed run, DeepSpeed need not
  be installed). Before loading, every global the pickle names is listed
  (``torch.serialization.get_unsafe_globals_in_checkpoint``): anything outside torch's own
  allow-list and ours is refused with an error naming the class and the file, and nothing is
  unpickled.
- DCP's ``.metadata`` (a plain pickle): read by an Unpickler whose ``find_class`` resolves only
  the DCP metadata classes, torch.Size / dtypes / layouts and paths.

``mmap=True`` maps tensor storages instead of reading them, so a loader that touches only the
adapter's slices of a file reads only those pages: the frozen base weights in the same file cost
no memory.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any

import torch

from .allow_list import DEEPSPEED_CLASSES, CheckpointError, brief  # noqa: F401 (re-exported)


_SAFE_GLOBALS = [(cls, name) for name, cls in DEEPSPEED_CLASSES.items()]


def _open_error(path: str, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {brief(exc)}")


def unsafe_globals(path: str) -> list[str]:
    """Globals a torch zip file's pickle names beyond torch's weights_only allow-list."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, zipfile.BadZipFile, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise _open_error(path, exc) from exc


def load_torch(path: str, mmap: bool = True) -> Any:
    """``torch.load`` of a file written by torch.save, refusing every object that is not a tensor,
    a container, a number or an allow-listed DeepSpeed class (named in the error with the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip checkpoint (truncated, corrupt, or the legacy "
                              "non-zip format, which cannot be read without unpickling)")
    refused = [name for name in unsafe_globals(path) if name not in DEEPSPEED_CLASSES]
    if refused:
        raise CheckpointError(f"{path}: refusing to unpickle {refused[0]!r}" +
                              (f" (and {len(refused) - 1} more)" if len(refused) > 1 else "") +
                              ": not a tensor, container or allow-listed DeepSpeed class; a pickle can run "
                              "arbitrary code. Nothing was loaded.")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused by the weights-only unpickler: {brief(exc)}") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise _open_error(path, exc) from exc


def load_tensor_bytes(data: bytes, where: str) -> torch.Tensor:
    """One tensor written by ``torch.save`` into a byte range (DCP's TORCH_SAVE items)."""
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{where}: not a readable tensor (truncated or corrupt?): {brief(exc)}") from exc
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: expected a tensor, found {type(value).__name__}")
    return value


def _dcp_allowed() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    # megatron-core's torch_dist writer caches every rank's save plan in Metadata.all_local_plans:
    # plain dataclasses and an enum of torch's planner, no callables
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"):
        allowed[("torch.distributed.checkpoint.planner", name)] = getattr(planner, name)
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: str) -> None:
        super().__init__(fh)
        self.path = path
        self.allowed = _dcp_allowed()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                           torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(f"{self.path}: refusing to unpickle {module}.{name}: not a DCP metadata class; "
                              "a pickle can run arbitrary code. Nothing was loaded.")


def load_dcp_metadata(path: str) -> Any:
    """DCP's ``.metadata`` through the restricted unpickler above."""
    try:
        with open(path, "rb") as fh:
            return _MetadataUnpickler(fh, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # EOFError, UnpicklingError, ... from a torn file
        raise CheckpointError(f"{path}: not a readable DCP metadata file (truncated or corrupt?): {brief(exc)}") from exc
