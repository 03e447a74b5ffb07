"""Safetensors files read and rewritten one tensor at a time (peak memory: one tensor).

- ``read_header``: the JSON header, parsed directly (names, dtypes, shapes, byte offsets).
- ``TensorFiles``: name -> tensor over a model directory (one file, or the shards its index lists);
  each read opens the file just for that tensor with ``safe_open`` (an mmap held open for the whole
  pass keeps every touched page resident, which shows as the full model in RSS).
- ``rewrite_file``: a copy of a file with some tensors replaced by same-shape, same-dtype ones,
  written in file order; the others are copied as raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Optional

import torch
from safetensors import safe_open

from .atomic import atomic_path


class StreamError(ValueError):
    """A missing, empty or malformed input (callers turn it into a one-line message)."""


def read_header(path: str) -> tuple[dict, int]:
    """The safetensors JSON header (name -> dtype, shape, data_offsets) and where the data starts.
    Read directly: it gives the byte layout, which lets untouched tensors be copied as raw bytes."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (struct.error, ValueError, MemoryError, OverflowError) as exc:  # ValueError: bad JSON / UTF-8
        raise StreamError(f"{path}: not a safetensors file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise StreamError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + size


class TensorFiles:
    """name -> file for a model directory (single file or sharded with an index) or one file;
    ``[name]`` opens the file just for that tensor (an mmap held open keeps touched pages resident)."""

    def __init__(self, path: str) -> None:
        if os.path.isfile(path):
            files = [path]
        elif os.path.isfile(os.path.join(path, "model.safetensors.index.json")):  # sharded: the shards it lists
            with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as fh:
                files = sorted({os.path.join(path, f) for f in json.load(fh)["weight_map"].values()})
        elif os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        else:
            raise StreamError(f"{path!r} does not exist")
        if not files:
            raise StreamError(f"no *.safetensors file in {path!r} (re-save the model with "
                              "save_pretrained(safe_serialization=True))")
        self.files = files
        self.where = {name: f for f in files for name in read_header(f)[0] if name != "__metadata__"}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], framework="pt", device="cpu") as fh:
            return fh.get_tensor(name)


def rewrite_file(src: str, dst: str, replace: Callable[[str], Optional[torch.Tensor]], progress) -> None:
    """Copy ``src`` to ``dst`` with some tensors replaced by same-shape, same-dtype ones: the header
    and the byte layout stay identical, so tensors are written one at a time in file order and the
    others are copied as raw bytes (bit-exact, no dtype round trip). Atomic (temp file + rename)."""
    header, start = read_header(src)
    order = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    if order and os.path.getsize(src) < start + order[-1][1]:
        raise StreamError(f"{src}: truncated safetensors file (shorter than its header says)")
    with open(src, "rb") as fin, atomic_path(dst) as tmp, open(tmp, "wb") as fout:
        fout.write(fin.read(start))  # size prefix + header, unchanged
        for begin, end, name in order:
            new = replace(name)
            if new is None:  # raw bytes, in chunks of at most 4 MiB
                fin.seek(start + begin)
                for at in range(begin, end, 4 << 20):
                    fout.write(fin.read(min(4 << 20, end - at)))
            else:
                data = new.contiguous().view(-1).view(torch.uint8).numpy()
                assert data.nbytes == end - begin, f"{name}: replacement has another size"
                fout.write(memoryview(data))
            progress.update(1)
