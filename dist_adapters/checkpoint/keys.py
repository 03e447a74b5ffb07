"""Parameter names as engines and libraries write them -> peft's adapter keys.

A checkpoint written by any engine names a LoRA factor in one of these ways (and combinations):

    model.layers.0.q_proj.lora_A.default.weight                          dist_adapters
    base_model.model.model.layers.0.q_proj.lora_A.default.weight         peft
    _fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.q_proj...   FSDP1 with use_orig_params
    _checkpoint_wrapped_module. / _orig_mod. (torch.compile) / module.   wrappers
    model.base_model.model....                                           accelerate's DCP layout ("model" outer key)

``normalise`` strips the wrappers, ``split_adapter_key`` recognises the adapter tensors and
returns (peft key without the adapter name, adapter name). peft's file keys are those of
``peft_format.to_peft_key``; this module only adds the spellings other writers use
(peft's ParameterDict entries have no ``.weight``; its trainable tokens sit under
``token_adapter`` when they come with LoRA).
"""

from __future__ import annotations

import re
from typing import Optional

from .peft_names import PREFIX

WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

_PATTERNS = [  # (regex on the cleaned name, peft key format)
    (re.compile(r"^(?P<m>.+)\.(?P<kind>lora_A|lora_B)\.(?P<a>[^.]+)\.weight$"), "{m}.{kind}.weight"),
    (re.compile(r"^(?P<m>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)\.(?P<a>[^.]+)(\.weight)?$"), "{m}.{kind}"),
    (re.compile(r"^(?P<m>.+?)(\.token_adapter)?\.trainable_tokens_delta\.(?P<a>[^.]+)(\.weight)?$"),
     "{m}.<tokens>trainable_tokens_delta"),
    (re.compile(r"^(?P<m>.+)\.modules_to_save\.(?P<a>[^.]+)\.(?P<rest>.+)$"), "{m}.{rest}"),
]
TOKEN_SLOT = "<tokens>"


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


def split_adapter_key(name: str) -> Optional[tuple[str, str]]:
    """(peft key with a token slot, adapter name) for an adapter tensor's cleaned name, else None."""
    for pattern, fmt in _PATTERNS:
        found = pattern.match(name)
        if found:
            return PREFIX + fmt.format(**found.groupdict()), found["a"]
    return None


def resolve_token_slot(key: str, with_lora: bool) -> str:
    """peft nests trainable tokens under ``token_adapter`` when the adapter is LoRA."""
    return key.replace(TOKEN_SLOT, "token_adapter." if with_lora else "")


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
        found: dict[str, dict[str, str]] = {}
        for name in names:
            hit = split_adapter_key(normalise(name, outer_prefix))
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
        self.to_source = {resolve_token_slot(k, self.with_lora): v for k, v in sorted(raw.items())}

    def __len__(self) -> int:
        return len(self.to_source)
