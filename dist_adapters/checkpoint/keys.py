"""Parameter names as engines and libraries write them -> peft's adapter keys.

A checkpoint written by any engine names a LoRA factor in one of these ways (and combinations):

    model.layers.0.q_proj.lora_A.default.weight                          dist_adapters
    base_model.model.model.layers.0.q_proj.lora_A.default.weight         peft
    _fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.q_proj...   FSDP1 with use_orig_params
    _checkpoint_wrapped_module. / _orig_mod. (torch.compile) / module.   wrappers
    model.base_model.model....                                           accelerate's DCP layout ("model" outer key)

``normalise`` strips the wrappers; ``ours`` rewrites peft's in-memory spellings into ours
(peft's ParameterDict entries have no ``.weight``; its trainable tokens sit under
``token_adapter``) and finds the adapter name. The mapping to file keys is then
``peft_names.to_peft_key``, the one save / load use.
"""

from __future__ import annotations

import re
from typing import Optional

from .peft_names import PREFIX, to_peft_key

WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

_SPELLINGS = [  # peft's in-memory names -> ours
    (re.compile(r"^(.+)\.(lora_embedding_[AB])\.([^.]+)$"), r"\1.\2.\3.weight"),
    (re.compile(r"^(.+?)(?:\.token_adapter)?\.trainable_tokens_delta\.([^.]+)(?:\.weight)?$"),
     r"\1.trainable_tokens_delta.\2.weight"),
]
_ADAPTER = re.compile(r"\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|trainable_tokens_delta|modules_to_save)"
                      r"\.([^.]+)\.")


def normalise(name: str, outer_prefix: str = "") -> str:
    """Drop an outer prefix (accelerate's ``model.``), wrapper infixes, a leading DDP
    ``module.`` and peft's ``base_model.model.``."""
    if outer_prefix and name.startswith(outer_prefix):
        name = name[len(outer_prefix):]
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    return name


def ours(name: str) -> Optional[tuple[str, str]]:
    """(our parameter name, adapter name) for an adapter tensor's cleaned name, else None."""
    for pattern, replacement in _SPELLINGS:
        name = pattern.sub(replacement, name)
    found = _ADAPTER.findall(name)
    if not found or to_peft_key(name, found[-1]) is None:
        return None
    return name, found[-1]


def module_of(key: str) -> str:
    """``base_model.model.<m>.lora_A.weight`` -> ``<m>`` (for LoRA and token keys)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for tail in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B",
                 ".token_adapter.trainable_tokens_delta", ".trainable_tokens_delta"):
        if key.endswith(tail):
            return key[: -len(tail)]
    return key


class AdapterKeys:
    """The mapping of one checkpoint's names to peft keys, for one adapter.

    ``names``: every tensor name in the checkpoint. Picks the adapter (``adapter_name`` or the only
    one present; ``default`` if several) and keeps, per peft key, the checkpoint name to read."""

    def __init__(self, names: list[str], where: str, adapter_name: Optional[str] = None, outer_prefix: str = "",
                 peft_keys: bool = False):
        if peft_keys:  # a PEFT directory / Megatron export: already peft's file keys, one adapter
            self.adapter_name, self.others = adapter_name or "default", []
            self.with_lora = any(".lora_" in n for n in names)
            self.to_source = {n: n for n in sorted(names)}
            return
        found: dict[str, dict[str, str]] = {}  # adapter -> our name -> the checkpoint's name
        for name in names:
            hit = ours(normalise(name, outer_prefix))
            if hit:
                found.setdefault(hit[1], {})[hit[0]] = name
        if not found:
            raise ValueError(f"{where}: no adapter tensors (lora_A/lora_B, lora_embedding_A/B, "
                             f"trainable_tokens_delta or modules_to_save) among its {len(names)} tensor names")
        if adapter_name is None:
            adapter_name = "default" if "default" in found or len(found) > 1 else next(iter(found))
            if adapter_name not in found:
                raise ValueError(f"{where}: holds adapters {sorted(found)}; choose one with --adapter-name")
        elif adapter_name not in found:
            raise ValueError(f"{where}: no adapter named {adapter_name!r}; it holds {sorted(found)}")
        self.adapter_name = adapter_name
        self.others = sorted(set(found) - {adapter_name})
        raw = found[adapter_name]
        self.with_lora = any(".lora_" in k for k in raw)
        prefix = "token_adapter." if self.with_lora else ""  # as peft_format._token_prefix
        self.to_source = dict(sorted((to_peft_key(k, adapter_name, prefix), v) for k, v in raw.items()))

    def __len__(self) -> int:
        return len(self.to_source)
