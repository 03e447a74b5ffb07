"""FSDP1 SHARDED_STATE_DICT saved as one ``torch.save`` file per rank, read without torch.

accelerate writes these with ``save_fsdp_model(..., use_dcp=False)`` as
``pytorch_model_fsdp_0_rank{r}.bin``; a plain FSDP1 run with
``torch.save(model.state_dict(), f"..._rank{r}.bin")`` under ``StateDictType.SHARDED_STATE_DICT``
writes the same. Each value is a ShardedTensor: the full ``size`` and this rank's
``local_shards`` (tensor + ``shard_offsets`` / ``shard_sizes``). A full tensor is the union of
every rank's shards at their offsets. torch_zip reads ShardedTensor and its metadata as plain
records (``sharded=True``); nothing else beyond tensors is unpickled.

LOCAL_STATE_DICT files look alike but hold ``_flat_param`` shards (the names next to them are
empty): the layout of a flat parameter is not in the file, so they are refused.
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

import numpy as np

from .allow_list import CheckpointError
from .torch_zip import ShardedTensorRecord, load

RANK_FILE = re.compile(r"^(?P<stem>.+)_rank(?P<rank>\d+)\.(bin|pt)$")


def find_rank_files(path: str) -> Optional[dict[int, str]]:
    """{rank: file} of the one ``STEM_rank{r}.bin`` family in ``path``, or None."""
    if not os.path.isdir(path):
        return None
    families: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(path)):
        found = RANK_FILE.match(name)
        if found:
            families.setdefault(found["stem"], {})[int(found["rank"])] = os.path.join(path, name)
    if not families:
        return None
    if len(families) > 1:  # accelerate also writes optimizer_0_rank{r}.bin next to the model's
        families = {k: v for k, v in families.items() if k.startswith("pytorch_model")} or families
    if len(families) > 1:
        raise CheckpointError(f"{path}: several per-rank file families {sorted(families)}; move the model's "
                              "files into a directory of their own")
    return next(iter(families.values()))


class RankFilesCheckpoint:
    format = "fsdp1-ranks"
    outer_prefix = ""

    def __init__(self, path: str, files: dict[int, str]) -> None:
        self.dir = path
        first = files[min(files)]
        data0 = self._load(first)
        records = [v for v in data0.values() if isinstance(v, ShardedTensorRecord)]
        if not records:
            raise CheckpointError(f"{first}: no ShardedTensor values: not an FSDP1 SHARDED_STATE_DICT file")
        self.world_size = 1 + max(m.placement._rank for m in records[0].metadata.shards_metadata)
        for r in range(self.world_size):
            if r not in files:
                expected = RANK_FILE.sub(lambda m: f"{m['stem']}_rank{r}.{m.group(3)}", os.path.basename(first))
                raise FileNotFoundError(f"{os.path.join(path, expected)}: missing; {first} says the checkpoint was "
                                        f"written by {self.world_size} ranks")
        extra = sorted(set(files) - set(range(self.world_size)))
        if extra:
            raise CheckpointError(f"{files[extra[0]]}: rank {extra[0]} does not belong to this checkpoint: {first} "
                                  f"says world size {self.world_size} (mismatched world size)")
        self.files = [files[r] for r in range(self.world_size)]
        self.data = [data0] + [self._load(f) for f in self.files[1:]]
        self.names = list(data0)
        self.shapes = {k: tuple(v.size) if isinstance(v, ShardedTensorRecord) else tuple(v.shape)
                       for k, v in data0.items() if isinstance(v, (ShardedTensorRecord, np.ndarray))}
        self.names = list(self.shapes)

    @staticmethod
    def _load(file: str) -> dict:
        data = load(file, sharded=True)
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: expected a state dict")
        flat = [k for k in data if k.endswith("_flat_param")]
        if flat:
            raise CheckpointError(
                f"{file}: an FSDP1 LOCAL_STATE_DICT file ({flat[0]!r}): its flat-parameter shards carry no "
                "parameter names or shapes, so they cannot be reassembled without the live model; save with "
                "SHARDED_STATE_DICT (DCP, accelerate's default) or FULL_STATE_DICT instead")
        return data

    def read(self, name: str) -> np.ndarray:
        first = self.data[0][name]
        if isinstance(first, np.ndarray):  # a plain (replicated) tensor
            return np.array(first)
        full = np.zeros(first.size, dtype=np.dtype(first.dtype))
        covered = 0
        for file, data in zip(self.files, self.data):
            record = data.get(name)
            if not isinstance(record, ShardedTensorRecord) or tuple(record.size) != tuple(first.size):
                raise CheckpointError(f"{file}: key {name!r} missing or of another size than in {self.files[0]} "
                                      "(a rank file from another run?)")
            for shard in record.local_shards:
                offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                if tuple(shard.tensor.shape) != tuple(sizes):
                    raise CheckpointError(f"{file}: key {name!r} shard at {offsets} has shape "
                                          f"{tuple(shard.tensor.shape)}, its metadata says {tuple(sizes)}")
                full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] = shard.tensor
                covered += math.prod(sizes)
        if covered != full.size:
            raise CheckpointError(f"{self.files[0]}: key {name!r} shards cover {covered} of {full.size} values")
        return full

    def describe(self) -> dict:
        return {"format": "FSDP1 sharded state dict (per-rank files)", "path": self.dir,
                "world_size": self.world_size, "files": len(self.files)}
