"""torch.distributed.checkpoint (DCP) directories, read one tensor at a time, offline.

Layout (``dcp.save(state_dict, checkpoint_id=DIR)`` from FSDP2, FSDP1 SHARDED_STATE_DICT,
torchtitan, accelerate's ``pytorch_model_fsdp_0/``):

    DIR/.metadata        pickled Metadata: per key its full size, dtype and chunks (offsets, sizes);
                         per chunk the file, byte offset and length it was written to
    DIR/__{r}_{i}.distcp rank r's chunks, each a torch.save'd tensor at its byte range

A key's full tensor is assembled from its chunks at their offsets; only the byte ranges of the
keys asked for are read. ``.metadata`` goes through a restricted unpickler (safe_load).
accelerate wraps the model's state dict as ``{"model": ...}``: in a ``pytorch_model_fsdp_N``
directory the outer ``model.`` is the prefix to strip.
"""

from __future__ import annotations

import math
import os
import re

import torch

from .safe_load import CheckpointError, load_dcp_metadata, load_tensor_bytes

METADATA = ".metadata"
_ACCELERATE_DIR = re.compile(r"^pytorch_model_fsdp_\d+$")
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def is_dcp_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


def find_dcp_dir(path: str) -> str | None:
    """``path`` itself, or accelerate's ``path/pytorch_model_fsdp_0``."""
    if is_dcp_dir(path):
        return path
    inner = os.path.join(path, "pytorch_model_fsdp_0")
    return inner if is_dcp_dir(inner) else None


class DcpCheckpoint:
    format = "dcp"

    def __init__(self, path: str) -> None:
        self.dir = path
        self.meta_path = os.path.join(path, METADATA)
        meta = load_dcp_metadata(self.meta_path)
        if not hasattr(meta, "state_dict_metadata") or not hasattr(meta, "storage_data"):
            raise CheckpointError(f"{self.meta_path}: not DCP metadata (no state_dict_metadata / storage_data)")
        self.tensors = {k: v for k, v in meta.state_dict_metadata.items() if hasattr(v, "chunks")}
        self.names = list(self.tensors)
        self.shapes = {k: tuple(v.size) for k, v in self.tensors.items()}
        self.storage = {(idx.fqn, tuple(idx.offset) if idx.offset is not None else None): info
                        for idx, info in meta.storage_data.items()}
        files = sorted({info.relative_path for info in self.storage.values()})
        ranks = sorted(int(m[1]) for m in map(_RANK_FILE.match, files) if m)
        self.world_size = max(ranks) + 1 if ranks else 1
        for name in files:  # a missing rank file is reported up front, not at the first key it holds
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{os.path.join(path, name)}: missing; {self.meta_path} lists chunks in it "
                                        f"(the checkpoint was written by {self.world_size} ranks)")
        self.files = files
        self.outer_prefix = "model." if _ACCELERATE_DIR.match(os.path.basename(os.path.normpath(path))) else ""

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].properties.dtype

    def read(self, name: str) -> torch.Tensor:
        meta = self.tensors[name]
        full = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        covered = 0
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            info = self.storage.get((name, offsets))
            if info is None:
                raise CheckpointError(f"{self.meta_path}: key {name!r} has no storage entry for its chunk at {offsets}")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{os.path.join(self.dir, info.relative_path)}: key {name!r} is stored with "
                                      f"transforms {list(info.transform_descriptors)} (not supported)")
            file = os.path.join(self.dir, info.relative_path)
            with open(file, "rb") as fh:
                fh.seek(info.offset)
                data = fh.read(info.length)
            if len(data) != info.length:
                raise CheckpointError(f"{file}: truncated: key {name!r} needs bytes {info.offset}..."
                                      f"{info.offset + info.length}, the file ends at {info.offset + len(data)}")
            part = load_tensor_bytes(data, f"{file} (key {name!r}, bytes at {info.offset})")
            if tuple(part.shape) != sizes:
                raise CheckpointError(f"{file}: key {name!r} chunk at {offsets} has shape {tuple(part.shape)}, "
                                      f"{self.meta_path} says {sizes}")
            full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = part
            covered += math.prod(sizes)
        if covered != full.numel():
            raise CheckpointError(f"{self.meta_path}: key {name!r} chunks cover {covered} of {full.numel()} values")
        return full

    def describe(self) -> dict:
        kind = "accelerate FSDP (DCP)" if self.outer_prefix else "torch DCP"
        return {"format": kind, "path": self.dir, "world_size": self.world_size, "files": len(self.files)}
