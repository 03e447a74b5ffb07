"""torchtitan DCP checkpoints of a LoRA run (``checkpoint/step-N/``), read as peft keys.

torchtitan (0.3.0, ``torchtitan/components/lora.py``) gives each target Linear two child
Linears, ``lora_a`` [r, in] and ``lora_b`` [out, r], scaled by alpha / rank. Its checkpointer
(``components/checkpointer/dcp.py``) saves the model's state dict flattened to the top level,
next to ``optimizer.*`` / ``lr_scheduler`` / ``dataloader`` / ``train_state`` (a last save:
the model only), base and LoRA together:

    layers.0.attention.qkv_linear.wqkv.lora_a.weight   one adapter on the fused q/k/v Linear
    layers.0.attention.qkv_linear.wqkv.lora_b.weight   rows laid out [kv head, (q heads of its
                                                       group..., k, v), head_dim]
    layers.0.attention.wo.lora_a.weight                (unfused attention: ...qkv_linear.wq /
    layers.0.feed_forward.w1.lora_b.weight              wk / wv, older: attention.wq ...)
    lm_head.lora_a.weight                              (older: output...)

The fused base weight is split into wq / wk / wv on save by torchtitan's own hook, its LoRA is
not: here the fused ``lora_b`` is cut per kv group into q, k and v rows (``lora_a`` is shared,
copied to each), as ``models/common/attention.py`` lays the fused rows out.

Names map to Hugging Face Llama as torchtitan's own ``models/llama3/state_dict_adapter.py`` maps
the base weights. torchtitan's attention uses complex (interleaved-pair) rotary embeddings, so
its q/k weights hold each head's rows in another order than HF's ``rotate_half`` layout: HF's
``W = P W_tt`` with ``P`` = ``view(heads, hd/2, 2, in).transpose(1, 2)``. For a LoRA delta
``B A`` that is ``(P B) A``: q/k ``lora_b`` rows take the same permutation, ``lora_a`` none.
The permutation and the fused split need the head counts, which no tensor holds: they come from
the HF base's ``config.json`` (``consolidate --base``). Reading is DCP's (dcp_reader), one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from .allow_list import CheckpointError
from .dcp_reader import DcpCheckpoint
from ..names import PREFIX

_FACTOR = re.compile(r"^(?P<m>.+)\.lora_(?P<kind>[ab])\.weight$")
_LAYER = re.compile(r"^layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_FUSED = "attention.qkv_linear.wqkv"
# torchtitan module (inside layers.N) -> HF Llama module; every spelling of attention
_LAYER_MODULES = {
    "attention.qkv_linear.wq": "self_attn.q_proj", "attention.wq": "self_attn.q_proj",
    "attention.qkv_linear.wk": "self_attn.k_proj", "attention.wk": "self_attn.k_proj",
    "attention.qkv_linear.wv": "self_attn.v_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
}
_TOP_MODULES = {"lm_head": "lm_head", "output": "lm_head"}
_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _layer_and_rest(name: str) -> tuple[Optional[str], str]:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    if name.startswith("model."):  # a checkpoint saved as {"model": state_dict}
        name = name[len("model."):]
    hit = _LAYER.match(name)
    return (hit["i"], hit["rest"]) if hit else (None, name)


def hf_modules(name: str) -> list[str]:
    """torchtitan module name -> the HF Llama modules it feeds ([] for one we do not map)."""
    layer, rest = _layer_and_rest(name)
    if layer is None:
        return [_TOP_MODULES[rest]] if rest in _TOP_MODULES else []
    if rest == _FUSED:
        return [f"model.layers.{layer}.self_attn.{p}_proj" for p in "qkv"]
    return [f"model.layers.{layer}.{_LAYER_MODULES[rest]}"] if rest in _LAYER_MODULES else []


def is_torchtitan_lora(names: list[str]) -> bool:
    return any((hit := _FACTOR.match(n)) and hf_modules(hit["m"]) for n in names)


def rotary_permute(b, heads: int):
    """A q/k ``lora_b`` [heads * hd, r] from torchtitan's row order to HF's (the permutation
    torchtitan's state_dict_adapter ``_permute`` applies to the base weight's rows)."""
    rows, r = b.shape
    if rows % (2 * heads):
        raise CheckpointError(f"a q/k lora_b with {rows} rows cannot hold {heads} heads of an even size: is --base "
                              "the model this run trained?")
    return b.reshape(heads, rows // heads // 2, 2, r).transpose(1, 2).reshape(rows, r).contiguous()


def fused_part(b, part: str, heads: dict):
    """q, k or v rows of a fused ``wqkv.lora_b``: rows are [kv head, q heads per kv + 2, head_dim]."""
    kv, hd = heads["kv"], heads["head_dim"]
    per_kv = heads["q"] // kv
    grouped = b.reshape(kv, per_kv + 2, hd, b.shape[1])
    pick = {"q": grouped[:, :per_kv], "k": grouped[:, per_kv], "v": grouped[:, per_kv + 1]}[part]
    return pick.reshape(-1, b.shape[1])


def head_counts(base: Optional[str], where: str) -> dict[str, int]:
    """q heads, kv heads and head size from the HF base's config.json."""
    if base is None:
        raise CheckpointError(f"{where}: a torchtitan checkpoint's q/k/v lora_b rows are in torchtitan's order "
                              "(fused q/k/v, rotary pairs), and the head counts that order them are in no tensor: "
                              "pass --base with the Hugging Face base model directory (its config.json)")
    path = os.path.join(base, "config.json") if os.path.isdir(base) else base
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
        heads = int(cfg["num_attention_heads"])
        return {"q": heads, "kv": int(cfg.get("num_key_value_heads") or heads),
                "head_dim": int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"--base {base}: no config.json with num_attention_heads and hidden_size "
                              f"({type(exc).__name__}: {exc})") from exc


class TorchtitanSource:
    """The reader interface of dcp_reader over a torchtitan checkpoint, named by peft keys."""

    format = "torchtitan"
    outer_prefix = ""
    peft_keys = True

    def __init__(self, dcp: DcpCheckpoint, base: Optional[str]) -> None:
        self.dcp, self.dir, self.world_size = dcp, dcp.dir, dcp.world_size
        self.heads = None
        # peft key -> (DCP key, fused part "q"/"k"/"v" or None, rotary heads field or None)
        self.to_source: dict[str, tuple[str, Optional[str], Optional[str]]] = {}
        for name in dcp.names:
            hit = _FACTOR.match(name)
            modules = hf_modules(hit["m"]) if hit else []
            for module in modules:
                kind, proj = hit["kind"].upper(), module.rsplit(".", 1)[-1]
                part = proj[0] if len(modules) == 3 and kind == "B" else None
                rotary = {"q_proj": "q", "k_proj": "kv"}.get(proj) if kind == "B" else None
                self.to_source[f"{PREFIX}{module}.lora_{kind}.weight"] = (name, part, rotary)
        if not self.to_source:
            raise CheckpointError(f"{dcp.dir}: no torchtitan LoRA tensors (layers.N.*.lora_a/lora_b.weight)")
        if any(part or rotary for _, part, rotary in self.to_source.values()):
            self.heads = head_counts(base, dcp.dir)
        self.names = sorted(self.to_source)
        self.shapes = {k: self._shape(*v) for k, v in self.to_source.items()}

    def _shape(self, name: str, part: Optional[str], _rotary) -> tuple:
        shape = self.dcp.shapes[name]
        if part is None:
            return shape
        rows = self.heads["head_dim"] * (self.heads["q"] if part == "q" else self.heads["kv"])
        return (rows, shape[1])

    def dtype(self, name: str):
        return self.dcp.dtype(self.to_source[name][0])

    def read(self, name: str):
        source, part, rotary = self.to_source[name]
        t = self.dcp.read(source)
        if part is not None:
            expected = self.heads["head_dim"] * (self.heads["q"] + 2 * self.heads["kv"])
            if t.shape[0] != expected:
                raise CheckpointError(f"{self.dir}: key {source!r} has {t.shape[0]} rows; the base's heads "
                                      f"({self.heads}) make {expected}: is --base the model this run trained?")
            t = fused_part(t, part, self.heads)
        return rotary_permute(t, self.heads[rotary]) if rotary else t.contiguous()

    def describe(self) -> dict:
        return {"format": "torchtitan DCP (LoRA)", "path": self.dir, "world_size": self.world_size,
                "files": len(self.dcp.files)}
