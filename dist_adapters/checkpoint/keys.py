"""Which tensors of a checkpoint are one adapter's, under peft's keys (``AdapterKeys``). The name
rules themselves are in ``dist_adapters/names.py``."""

from __future__ import annotations

from typing import Optional

from ..names import normalise, ours, to_peft_key, token_prefix


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
        prefix = token_prefix(self.with_lora)
        self.to_source = dict(sorted((to_peft_key(k, adapter_name, prefix), v) for k, v in raw.items()))

    def __len__(self) -> int:
        return len(self.to_source)
