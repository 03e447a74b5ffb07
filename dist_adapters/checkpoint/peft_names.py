"""The PEFT checkpoint format's names: file names, the key prefix, and the key mapping between
our parameter names and peft's file keys (the table in peft_format.py). Kept free of torch and of
the layers, so that offline readers (consolidate) use the same mapping as save / load.
"""

from __future__ import annotations

import re
from typing import Optional

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

_LORA_FACTOR = re.compile(r"^(?P<m>.+)\.(?P<kind>lora_A|lora_B)\.(?P<a>[^.]+)\.weight$")
_EMB_FACTOR = re.compile(r"^(?P<m>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)\.(?P<a>[^.]+)\.weight$")
_SAVED_COPY = re.compile(r"^(?P<m>.+)\.modules_to_save\.(?P<a>[^.]+)\.(?P<rest>.+)$")
_TOKEN_ROWS = re.compile(r"^(?P<m>.+)\.trainable_tokens_delta\.(?P<a>[^.]+)\.weight$")
_PEFT_TOKEN_ROWS = re.compile(r"^(?P<m>.+?)(?P<wrap>\.token_adapter)?\.trainable_tokens_delta$")


def to_peft_key(key: str, adapter_name: str, token_prefix: str = "") -> Optional[str]:
    """Our parameter name -> peft's file key, or None when the key belongs to another adapter
    or is not an adapter tensor at all."""
    found = _TOKEN_ROWS.match(key)
    if found:
        return PREFIX + f"{found['m']}.{token_prefix}trainable_tokens_delta" if found["a"] == adapter_name else None
    for pattern, fmt in ((_LORA_FACTOR, "{m}.{kind}.weight"), (_EMB_FACTOR, "{m}.{kind}")):
        found = pattern.match(key)
        if found:
            return PREFIX + fmt.format(**found.groupdict()) if found["a"] == adapter_name else None
    found = _SAVED_COPY.match(key)
    if found:
        return PREFIX + f"{found['m']}.{found['rest']}" if found["a"] == adapter_name else None
    return None


def from_peft_key(key: str, adapter_name: str, copies: set[str]) -> str:
    """peft's file key -> our parameter name. ``copies``: names of our ModulesToSave modules."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    found = _PEFT_TOKEN_ROWS.match(key)
    if found:
        return f"{found['m']}.trainable_tokens_delta.{adapter_name}.weight"
    for kind in ("lora_A", "lora_B"):
        if key.endswith(f".{kind}.weight"):
            return key[: -len(".weight")] + f".{adapter_name}.weight"
    for kind in ("lora_embedding_A", "lora_embedding_B"):
        if key.endswith(f".{kind}"):
            return f"{key}.{adapter_name}.weight"
    for module in copies:
        if key.startswith(module + "."):
            return f"{module}.modules_to_save.{adapter_name}.{key[len(module) + 1:]}"
    return key
