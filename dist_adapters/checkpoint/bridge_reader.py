"""Megatron-Bridge LoRA checkpoints (megatron-core ``dist_checkpointing``, torch_dist), read as
peft keys without megatron.

Layout (Bridge 0.3.1 ``training/checkpointing.py``; the saved state is megatron-core's
``sharded_state_dict`` of the model, filtered to keys with ``.adapter.``):

    SAVE/latest_checkpointed_iteration.txt        "10"
    SAVE/iter_0000010/.metadata, __R_I.distcp      torch DCP: what dcp_reader reads
    SAVE/iter_0000010/metadata.json                {"sharded_backend": "torch_dist", ...}
    SAVE/iter_0000010/run_config.yaml              peft: {dim, alpha, dropout, target_modules}, model: {...}

Bridge's LoRA (``peft/utils.py`` ParallelLinearAdapter) puts ``adapter.linear_in`` (A, [r, in])
and ``adapter.linear_out`` (B, [out, r]) beside each target, scaled by alpha / dim. With
homogeneous layers megatron-core stacks every layer's tensor on a leading axis under one key
(``decoder.layers.self_attention.linear_qkv.adapter.linear_in.weight``, [L, r, hidden]);
otherwise the key keeps its index (``decoder.layers.3.…``). The global tensors do not depend on
the tensor-parallel size: DCP chunks are assembled by their offsets, and fc1's B is stored
``[gate; up]`` by megatron's swiglu factory whatever TP wrote it.

    linear_qkv  -> q_proj / k_proj / v_proj   A shared; B rows per query group [q heads..., k, v]
    linear_proj -> o_proj
    linear_fc1  -> gate_proj / up_proj        A shared; B = [gate; up]
    linear_fc2  -> down_proj

The head counts of the qkv split and r / alpha / dropout come from ``run_config.yaml``.
``optimizer.*`` keys (which also contain ``.adapter.``) and ``_extra_state`` bytes are skipped; any
other adapter tensor (canonical LoRA's adapter_q, MoE experts, ...) is refused by name rather
than dropped.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from .allow_list import CheckpointError
from ..names import PREFIX

RUN_CONFIG = "run_config.yaml"
TRACKER = "latest_checkpointed_iteration.txt"
_KEY = re.compile(r"^decoder\.layers\.(?:(?P<i>\d+)\.)?(?P<target>self_attention\.linear_qkv|"
                  r"self_attention\.linear_proj|mlp\.linear_fc1|mlp\.linear_fc2)\.adapter\.(?P<f>linear_in|linear_out)"
                  r"\.weight$")
_HF = {"self_attention.linear_qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
       "self_attention.linear_proj": ["self_attn.o_proj"],
       "mlp.linear_fc1": ["mlp.gate_proj", "mlp.up_proj"],
       "mlp.linear_fc2": ["mlp.down_proj"]}


def bridge_iteration_dir(path: str) -> Optional[str]:
    """``path`` if it is an ``iter_N`` directory with run_config.yaml, or the one the tracker names."""
    if os.path.isfile(os.path.join(path, RUN_CONFIG)) and os.path.isfile(os.path.join(path, ".metadata")):
        return path
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as fh:
            text = fh.read().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name is None:
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
        inner = os.path.join(path, name)
        if not os.path.isdir(inner):
            raise CheckpointError(f"{tracker}: names {name}, which is not in {path}")
        return inner if os.path.isfile(os.path.join(inner, RUN_CONFIG)) else None
    return None


def read_run_config(path: str) -> dict:
    """``peft`` and ``model`` of run_config.yaml (yaml.safe_load, as Bridge reads it)."""
    import yaml

    file = os.path.join(path, RUN_CONFIG)
    try:
        with open(file, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file}: not readable YAML ({type(exc).__name__})") from exc
    peft, model = (data or {}).get("peft"), (data or {}).get("model")
    if not isinstance(peft, dict) or not isinstance(model, dict):
        raise CheckpointError(f"{file}: no 'peft' and 'model' sections (not a Megatron-Bridge PEFT run?)")
    target = str(peft.get("_target_", ""))
    if not target.endswith(".LoRA"):
        raise CheckpointError(f"{file}: peft._target_ is {target!r}; this reader maps Megatron-Bridge's LoRA "
                              "(megatron.bridge.peft.lora.LoRA) only")
    for section, key in (("peft", "dim"), ("peft", "alpha"), ("model", "num_attention_heads"),
                         ("model", "hidden_size")):
        if not isinstance((peft if section == "peft" else model).get(key), (int, float)):
            raise CheckpointError(f"{file}: {section}.{key} missing or not a number")
    return {"peft": peft, "model": model, "file": file}


class BridgeSource:
    """The reader interface of dcp_reader over a Megatron-Bridge LoRA checkpoint, named by peft keys."""

    format = "megatron-bridge"
    outer_prefix = ""
    peft_keys = True

    def __init__(self, dcp) -> None:
        self.dcp, self.dir, self.world_size = dcp, dcp.dir, dcp.world_size
        self.run = read_run_config(dcp.dir)
        model = self.run["model"]
        heads = int(model["num_attention_heads"])
        self.heads = {"q": heads, "groups": int(model.get("num_query_groups") or heads),
                      "head_dim": int(model.get("kv_channels") or int(model["hidden_size"]) // heads)}
        self.to_source: dict[str, tuple[str, Optional[int], int, int]] = {}  # key -> (DCP key, layer, part, parts)
        self.shapes: dict[str, tuple] = {}
        for name in dcp.names:
            if name.startswith("optimizer.") or ".adapter." not in name:
                continue
            hit = _KEY.match(name)
            if hit is None:
                raise CheckpointError(f"{dcp.dir}: key {name!r} is an adapter tensor this reader does not map "
                                      "(Megatron-Bridge LoRA on linear_qkv / linear_proj / linear_fc1 / linear_fc2)")
            self._add(name, hit)
        if not self.to_source:
            raise CheckpointError(f"{dcp.dir}: no Megatron-Bridge adapter tensors (decoder.layers.*.adapter.*)")
        self.names = sorted(self.to_source)
        self._cache: tuple[Optional[str], object] = (None, None)

    def _add(self, name: str, hit) -> None:
        shape = self.dcp.shapes[name]
        stacked = hit["i"] is None
        layers = range(shape[0]) if stacked else [int(hit["i"])]
        matrix = shape[1:] if stacked else shape
        kind = "A" if hit["f"] == "linear_in" else "B"
        modules = _HF[hit["target"]]
        for layer in layers:
            for part, module in enumerate(modules):
                key = f"{PREFIX}model.layers.{layer}.{module}.lora_{kind}.weight"
                split = kind == "B" and len(modules) > 1
                self.to_source[key] = (name, layer if stacked else None, part if split else -1, len(modules))
                self.shapes[key] = (self._rows(hit["target"], part, matrix[0]), matrix[1]) if split else tuple(matrix)

    def _rows(self, target: str, part: int, total: int) -> int:
        if target == "mlp.linear_fc1":
            return total // 2
        h = self.heads
        return h["head_dim"] * (h["q"] if part == 0 else h["groups"])

    def dtype(self, name: str):
        return self.dcp.dtype(self.to_source[name][0])

    def _tensor(self, source: str):
        if self._cache[0] != source:  # a stacked key serves every layer's keys: read it once
            self._cache = (source, self.dcp.read(source))
        return self._cache[1]

    def read(self, name: str):
        source, layer, part, parts = self.to_source[name]
        t = self._tensor(source)
        t = t[layer] if layer is not None else t
        if part < 0:
            return t.clone()
        if parts == 2:  # fc1: [gate; up]
            return t.chunk(2, 0)[part].clone()
        h = self.heads
        per_group = h["q"] // h["groups"]
        if t.shape[0] != h["head_dim"] * (h["q"] + 2 * h["groups"]):
            raise CheckpointError(f"{self.dir}: key {source!r} has {t.shape[0]} rows per layer; "
                                  f"{self.run['file']} gives {h} heads, which make "
                                  f"{h['head_dim'] * (h['q'] + 2 * h['groups'])}")
        grouped = t.reshape(h["groups"], per_group + 2, h["head_dim"], t.shape[-1])
        pick = [grouped[:, :per_group], grouped[:, per_group], grouped[:, per_group + 1]][part]
        return pick.reshape(-1, t.shape[-1]).clone()

    def own_config(self):
        """(LoraConfig, origin) from run_config.yaml: r = dim, lora_alpha = alpha, HF target names."""
        from ..config import LoraConfig

        peft = self.run["peft"]
        targets = sorted({k.rsplit(".", 3)[-3] for k in self.names})
        return (LoraConfig(r=int(peft["dim"]), lora_alpha=peft["alpha"], lora_dropout=float(peft.get("dropout") or 0),
                           target_modules=targets), self.run["file"])

    def describe(self) -> dict:
        return {"format": "Megatron-Bridge torch_dist (LoRA)", "path": self.dir, "world_size": self.world_size,
                "files": len(self.dcp.files)}
