"""Reading ``torch.save`` zip files without torch, as memory-mapped numpy arrays.

Why: ``dist-adapters consolidate`` on a DeepSpeed checkpoint needs a few MB of fp32 slices out
of files that are mostly frozen weights and Adam moments. Importing torch alone costs ~1.4 s
and ~220 MB of resident memory here, more than the whole job; this reader needs numpy only.

The format (torch >= 1.6): a zip archive, entries stored uncompressed,

    <name>/data.pkl      the pickled object; each tensor is
                         torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...),
                         each storage a persistent id ('storage', torch.FloatStorage, key, device, numel)
    <name>/data/<key>    the storage's raw bytes (little endian unless <name>/byteorder says big)

Safety, the same rule as torch's ``weights_only=True``: the Unpickler's ``find_class`` resolves
only the names in ``ALLOWED`` (tensor rebuild functions, storage types, OrderedDict, torch.Size,
the DeepSpeed classes of allow_list.DEEPSPEED_CLASSES as inert stand-ins); any other global (a
function that would run code) raises an error naming it and the file, before anything is called.
Storages are ``np.memmap`` views: only the storages a caller reads are paged in, each checked
once against its zip record's CRC32 (``data.pkl`` is checked by zipfile as it is read).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from .allow_list import DEEPSPEED_CLASSES, CheckpointError, brief

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class Size(tuple):
    """torch.Size stand-in (pickled as torch.Size((d0, d1, ...)))."""

    def numel(self) -> int:
        out = 1
        for d in self:
            out *= d
        return out


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Storage:
    """A storage entry, mapped on first use."""

    def __init__(self, reader: "_Reader", key: str, kind: _StorageType, numel: int) -> None:
        self.reader, self.key, self.kind, self.numel = reader, key, kind, numel
        self._array = None

    def array(self) -> np.ndarray:
        if self._array is None:
            if self.kind.dtype == "bfloat16":
                raise CheckpointError(f"{self.reader.path}: a bfloat16 tensor (storage {self.key}); this reader "
                                      "maps fp32/fp16 data only")
            self._array = self.reader.map(self.key, np.dtype(self.kind.dtype), self.numel)
        return self._array


def _rebuild_tensor_v2(storage: _Storage, offset: int, size, stride, requires_grad=False, hooks=None,
                       metadata=None) -> np.ndarray:
    base = storage.array()
    if not size:
        return base[offset: offset + 1].reshape(())
    item = base.itemsize
    return np.lib.stride_tricks.as_strided(base[offset:], shape=tuple(size), strides=tuple(s * item for s in stride),
                                           writeable=False)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *state) -> Any:
    return data


class _TensorType:
    """torch.Tensor / torch.nn.Parameter as the ``new_type`` argument of _rebuild_from_type_v2."""


def _rebuild_from_type_v2(func, new_type, args, state) -> Any:
    if func is _rebuild_wrapper_subclass and new_type is ShardedTensorRecord:
        out = func(*args)
        out.__setstate__(state)
        return out
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or new_type is not _TensorType:
        raise pickle.UnpicklingError("_rebuild_from_type_v2 with a function or type outside the allow-list")
    return func(*args)


# -- FSDP1 SHARDED_STATE_DICT files: ShardedTensor and its metadata, as plain records ---------------
class _Record:
    """Stand-in for a pickled metadata object: keeps its attributes (BUILD state), nothing else."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict or None, slot dict or None)
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class ShardedTensorRecord(_Record):
    """torch.distributed._shard.sharded_tensor.ShardedTensor: ``size`` and ``local_shards``
    (records with ``tensor`` and ``metadata.shard_offsets`` / ``shard_sizes``)."""

    def __setstate__(self, state: Any) -> None:  # ShardedTensor.__getstate__: (local_shards, metadata, ...)
        self.local_shards, self.metadata = state[0], state[1]


def _rebuild_wrapper_subclass(cls, dtype, size, *rest) -> Any:
    if cls is not ShardedTensorRecord:
        raise pickle.UnpicklingError("_rebuild_wrapper_subclass of a class outside the allow-list")
    out = ShardedTensorRecord()
    out.size, out.dtype = tuple(size), dtype
    return out


class _MemFormat(_Record):
    """torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING (an Enum)."""


class _ProcessGroupState(_Record):
    """ShardedTensor.ProcessGroupState (a NamedTuple of ranks and world sizes)."""


def _getattr(obj: Any, name: str) -> Any:
    """``builtins.getattr``, for the two lookups ShardedTensor pickles make: an enum member of
    MEM_FORMAT_ENCODING and the nested class ShardedTensor.ProcessGroupState."""
    if obj is ShardedTensorRecord and name == "ProcessGroupState":
        return _ProcessGroupState
    if obj is not _MemFormat:
        raise pickle.UnpicklingError(f"getattr on an object outside the allow-list: {obj!r:.60}, {name!r:.40}")
    return name


_SHARD = "torch.distributed._shard."
SHARDED_TENSOR: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_wrapper_subclass"): _rebuild_wrapper_subclass,
    (_SHARD + "sharded_tensor.api", "ShardedTensor"): ShardedTensorRecord,
    (_SHARD + "sharded_tensor.shard", "Shard"): type("Shard", (_Record,), {}),
    (_SHARD + "metadata", "ShardMetadata"): type("ShardMetadata", (_Record,), {}),
    (_SHARD + "sharded_tensor.metadata", "ShardedTensorMetadata"): type("ShardedTensorMetadata", (_Record,), {}),
    (_SHARD + "sharded_tensor.metadata", "TensorProperties"): type("TensorProperties", (_Record,), {}),
    (_SHARD + "sharded_tensor.metadata", "MEM_FORMAT_ENCODING"): _MemFormat,
    (_SHARD + "sharding_spec.chunk_sharding_spec", "ChunkShardingSpec"): type("ChunkShardingSpec", (_Record,), {}),
    ("torch.distributed.remote_device", "_remote_device"): type("_remote_device", (_Record,), {}),
    ("torch", "device"): str,
    ("torch.serialization", "_get_layout"): str,
    ("builtins", "getattr"): _getattr,
    **{("torch", name): name for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                         "uint8", "int8", "bool")},
}


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch", "Size"): Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    **{tuple(name.rsplit(".", 1)): cls for name, cls in DEEPSPEED_CLASSES.items()},
}


class _Reader(pickle.Unpickler):
    def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str, sharded: bool = False) -> None:
        super().__init__(io.BytesIO(zf.read(prefix + "data.pkl")))
        self.path, self.zf, self.prefix = path, zf, prefix
        self.allowed = {**ALLOWED, **SHARDED_TENSOR} if sharded else ALLOWED
        order = prefix + "byteorder"
        self.big = order in zf.namelist() and zf.read(order).strip() == b"big"

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 pickles name it so
        found = self.allowed.get((module, name))
        if found is None:
            raise CheckpointError(f"{self.path}: refusing to unpickle {module}.{name}: not a tensor, container or "
                                  "allow-listed DeepSpeed class; a pickle can run arbitrary code. Nothing was run.")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r:.80}")
        return _Storage(self, str(pid[2]), pid[1], int(pid[4]))

    def map(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        """np.memmap of ``<prefix>data/<key>`` (a stored, uncompressed zip entry)."""
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: storage entry {name!r} is missing (truncated?)") from None
        if info.compress_type != zipfile.ZIP_STORED or info.file_size < numel * dtype.itemsize:
            raise CheckpointError(f"{self.path}: storage entry {name!r} is compressed or shorter than its "
                                  f"{numel} values")
        with open(self.path, "rb") as fh:  # the entry's data follows its local header
            fh.seek(info.header_offset)
            header = fh.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: bad zip local header for {name!r} (truncated or corrupt?)")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > os.path.getsize(self.path):
            raise CheckpointError(f"{self.path}: truncated: {name!r} ends past the end of the file")
        _check_crc(self.path, name, start, info.file_size, info.CRC)
        return np.memmap(self.path, dtype=dtype.newbyteorder(">" if self.big else "<"), mode="r", offset=start,
                         shape=(numel,))


def _check_crc(path: str, name: str, start: int, size: int, recorded: int) -> None:
    """The zip record's CRC32 against its bytes, checked once per storage as it is mapped (the
    memory-mapped reads would otherwise take a flipped byte as data). Read in 16 MiB pieces, not
    through the map, so a record's pages do not stay in this process's resident memory. torch
    writes the CRC of every record; a recorded 0 over data that sums otherwise is a writer that
    skipped it (``torch.serialization.config.save.compute_crc32 = False``): nothing to check."""
    found, left = 0, size
    with open(path, "rb") as fh:
        fh.seek(start)
        while left:
            piece = fh.read(min(left, 1 << 24))
            if not piece:
                break
            found, left = zlib.crc32(piece, found), left - len(piece)
    if found != recorded and recorded != 0:
        raise CheckpointError(f"{path}: record {name!r} fails its CRC32 check (recorded {recorded:08x}, "
                              f"found {found:08x}): the file is corrupt")


def load(path: str, sharded: bool = False) -> Any:
    """The object ``torch.save`` wrote to ``path``, tensors as read-only memory-mapped arrays.
    ``sharded``: also allow FSDP1's ShardedTensor and its metadata (as records)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing")
    try:
        zf = zipfile.ZipFile(path)
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch zip checkpoint (truncated, corrupt, or the legacy "
                              f"non-zip format): {exc}") from exc
    if len(pkl) != 1:
        raise CheckpointError(f"{path}: not a torch checkpoint (expected one data.pkl entry, found {len(pkl)})")
    try:
        return _Reader(path, zf, pkl[0][: -len("data.pkl")], sharded).load()
    except CheckpointError:
        raise
    except Exception as exc:  # EOFError, UnpicklingError, zlib/CRC errors from a torn file
        raise CheckpointError(f"{path}: could not read its pickle (truncated or corrupt?): {brief(exc)}") from exc
