"""Per-TP-rank adapter export in Megatron's layout, and its offline reader.

    DIR/adapter_config.json                    (first rank)
    DIR/mp_rank_00/adapter_model.safetensors   TP rank 0's tensors: its shards + full replicated ones
    DIR/mp_rank_00/shards.json                 {"tp_size", "tp_rank", "sharded": {key: dim}}
    DIR/mp_rank_01/...

Keys are peft's (``base_model.model.<m>.lora_A.weight``), so ``read_megatron_shards`` gives
exactly ``da.adapter_state_dict``. Saving is collective but needs no communication beyond a
barrier: each rank writes what it holds. With data parallelism only the first DP rank of each
TP rank writes (the DP replicas hold the same tensors).
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import LoraConfig
from ..control import get_config, unwrap
from ..names import MEGATRON_SHARDS_NAME, WEIGHTS_NAME, clean_name, to_peft_key, token_prefix
from ..parallel.megatron import tp_shard
from ..process_group import barrier, rank
from .atomic import atomic_path, atomic_write_text

_RANK_DIR = re.compile(r"^mp_rank_(\d+)$")


def _megatron_ranks() -> tuple[int, int, int]:
    """(tp_size, tp_rank, dp_rank) from megatron.core.parallel_state."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("save_megatron_shards needs megatron.core.parallel_state.initialize_model_parallel(...) "
                           "to have run on every rank")
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("save_megatron_shards with pipeline parallelism (pipeline_model_parallel_size > 1) "
                                  "is not implemented")
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank())


def save_megatron_shards(model: nn.Module, directory: str, adapter_name: str = "default") -> str:
    """Each TP rank writes ``directory/mp_rank_{tp_rank:02d}/`` with its LOCAL adapter tensors.
    Collective: every rank must call it (it ends with a barrier). Returns ``directory``."""
    tp_size, tp_rank, dp_rank = _megatron_ranks()
    inner = unwrap(model)
    config = get_config(inner, adapter_name)
    prefix = token_prefix(isinstance(config, LoraConfig))
    tensors, sharded = {}, {}
    for name, p in inner.named_parameters():
        key = to_peft_key(clean_name(name), adapter_name, prefix)
        if key is None:
            continue
        tensors[key] = p.detach().to("cpu").contiguous().clone()
        shard = tp_shard(p)
        if shard is not None:
            sharded[key] = shard.dim
    if not tensors:
        raise RuntimeError(f"adapter {adapter_name!r} has no tensors to save")
    if dp_rank == 0:
        sub = os.path.join(directory, f"mp_rank_{tp_rank:02d}")
        os.makedirs(sub, exist_ok=True)
        with atomic_path(os.path.join(sub, WEIGHTS_NAME)) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        info = {"tp_size": tp_size, "tp_rank": tp_rank, "sharded": dict(sorted(sharded.items()))}
        atomic_write_text(os.path.join(sub, MEGATRON_SHARDS_NAME), json.dumps(info, indent=2) + "\n")
    if rank() == 0:
        config.save(directory, inference_mode=True)
    barrier()
    return directory


def _read_rank(sub: str) -> tuple[dict, dict[str, torch.Tensor]]:
    info_path, weights_path = os.path.join(sub, MEGATRON_SHARDS_NAME), os.path.join(sub, WEIGHTS_NAME)
    for path in (info_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (incomplete Megatron adapter export?)")
    try:
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    except ValueError as exc:
        raise ValueError(f"{info_path}: not valid JSON (truncated or corrupt?): {exc}") from exc
    if not (isinstance(info, dict) and isinstance(info.get("tp_size"), int) and isinstance(info.get("sharded"), dict)):
        raise ValueError(f"{info_path}: not a shard description (needs integer 'tp_size' and a 'sharded' mapping)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    return info, tensors


def read_megatron_shards(directory: str) -> dict[str, torch.Tensor]:
    """Full adapter tensors (peft keys) from a ``save_megatron_shards`` directory, offline: sharded
    keys are concatenated in TP-rank order, replicated keys checked equal across ranks."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory")
    found = sorted(int(m[1]) for m in map(_RANK_DIR.match, os.listdir(directory)) if m)
    if not found:
        raise FileNotFoundError(f"{directory}: no mp_rank_NN directories (not a Megatron adapter export)")
    first = os.path.join(directory, "mp_rank_00")
    info0, _ = _read_rank(first)
    tp_size = int(info0["tp_size"])
    expected = list(range(tp_size))
    for r in expected:
        if r not in found:
            raise FileNotFoundError(f"{os.path.join(directory, f'mp_rank_{r:02d}')}: missing; "
                                    f"{first}/{MEGATRON_SHARDS_NAME} says tp_size={tp_size}")
    if found != expected:
        extra = os.path.join(directory, f"mp_rank_{max(found):02d}")
        raise ValueError(f"{extra}: unexpected, {first}/{MEGATRON_SHARDS_NAME} says tp_size={tp_size}")
    ranks = [_read_rank(os.path.join(directory, f"mp_rank_{r:02d}")) for r in expected]
    keys0 = set(ranks[0][1])
    out: dict[str, torch.Tensor] = {}
    for r, (info, tensors) in enumerate(ranks):
        file = os.path.join(directory, f"mp_rank_{r:02d}", WEIGHTS_NAME)
        if info["sharded"] != info0["sharded"] or int(info["tp_size"]) != tp_size:
            raise ValueError(f"{os.path.join(os.path.dirname(file), MEGATRON_SHARDS_NAME)}: shard description differs "
                             f"from mp_rank_00's")
        if set(tensors) != keys0:
            diff = sorted(set(tensors) ^ keys0)
            raise ValueError(f"{file}: keys differ from mp_rank_00's, e.g. {diff[:3]}")
    for key in sorted(keys0):
        parts = [tensors[key] for _, tensors in ranks]
        dim = info0["sharded"].get(key)
        for r, t in enumerate(parts[1:], start=1):
            file = os.path.join(directory, f"mp_rank_{r:02d}", WEIGHTS_NAME)
            if t.shape != parts[0].shape or t.dtype != parts[0].dtype:  # Megatron shards are equal-sized
                kind = f"shard (dim {dim})" if dim is not None else "replicated tensor"
                raise ValueError(f"{file}: key {key!r} is a {kind} of shape {tuple(t.shape)} {t.dtype}, but "
                                 f"mp_rank_00 has {tuple(parts[0].shape)} {parts[0].dtype}")
            if dim is None and not torch.equal(t, parts[0]):
                raise ValueError(f"{file}: replicated key {key!r} differs from mp_rank_00's copy "
                                 f"(max |diff| {(t - parts[0]).abs().max().item():.3g})")
        out[key] = torch.cat(parts, dim=dim) if dim is not None else parts[0]
    return out
