"""What a serving engine accepts of an adapter, checked before it is shipped (issue 22).

The rules are data (``data/<target>_rules.json``, each file naming its sources in the serving
engine's code), so a new engine version changes a file, not this code. Each rule names a config
key or a tensor-key fragment, what the engine does with it, and what to change. The rank rule
is built in: every rank of the adapter (``r`` and ``rank_pattern``) against ``max_lora_rank``,
with the smallest allowed value that would serve it; so is the pairing of 3-D expert LoRA
(``moe_3d``: its wording is data). Not checked: whether the base's vLLM model class reads 3-D
expert LoRA by default (that depends on the model, not the adapter; see the rules' sources).
Torch-free (consolidate's offline path).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Optional

TARGETS = ("vllm",)


def rules(target: str) -> dict:
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    with open(os.path.join(os.path.dirname(__file__), "data", f"{target}_rules.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _applies(rule: dict, value: Any) -> bool:
    when = rule["when"]
    if when == "set":
        return bool(value)
    if when == "true":
        return value is True
    if when == "not_none":
        return value not in (None, "none")
    raise ValueError(f"unknown rule condition {when!r}")


def _rank_problem(config: dict, table: dict, max_lora_rank: Optional[int]) -> Optional[str]:
    limit = max_lora_rank if max_lora_rank is not None else table["default_max_lora_rank"]
    ranks = {"r": config.get("r") or 0, **{f"rank_pattern[{k!r}]": v for k, v in (config.get("rank_pattern") or {}).items()}}
    where, rank = max(ranks.items(), key=lambda kv: kv[1])
    if rank <= limit:
        return None
    allowed = [m for m in table["max_lora_ranks"] if m >= rank]
    fix = (f"serve with --max-lora-rank {allowed[0]}" if allowed else
           f"retrain with a rank of at most {table['max_lora_ranks'][-1]}, the largest vLLM serves")
    return f"rank {rank} ({where}) is greater than --max-lora-rank {limit}: {fix}"


_EXPERTS = re.compile(r"^(?P<m>.+\.experts)(?P<inner>\.base_layer)?\.lora_A\.weight$")


def _moe_problems(keys: list[str], rule: dict) -> list[str]:
    """LoRA on the 3-D expert weights (peft's target_parameters; nested ParamWrappers save the
    inner one under ``experts.base_layer``): each experts module needs both factors' pairs."""
    held: dict[str, set[str]] = {}
    for key in keys:
        hit = _EXPERTS.match(key)
        if hit:
            held.setdefault(hit["m"], set()).add("experts.base_layer.lora_A" if hit["inner"] else "experts.lora_A")
    return [f"{rule['problem'].format(module=repr(m), held=', '.join(sorted(h)))}: {rule['fix']}"
            for m, h in sorted(held.items()) if len(h) < 2]


def problems(target: str, config: dict, keys: Iterable[str], max_lora_rank: Optional[int] = None) -> list[str]:
    """Each incompatibility as "what; what to change" (empty: the engine accepts the adapter)."""
    table = rules(target)
    found = []
    rank = _rank_problem(config, table, max_lora_rank)
    if rank:
        found.append(rank)
    keys = sorted(keys)
    for rule in table["rules"]:
        if "config_key" in rule:
            value = config.get(rule["config_key"])
            if _applies(rule, value):
                found.append(f"{rule['problem'].format(value=json.dumps(value))}: {rule['fix']}")
        else:
            hit = next((k for k in keys if rule["key_contains"] in k), None)
            if hit is not None:
                found.append(f"{rule['problem'].format(key=repr(hit))}: {rule['fix']}")
    if "moe_3d" in table:
        found += _moe_problems(keys, table["moe_3d"])
    return found


def check(target: str, config: dict, keys: Iterable[str], max_lora_rank: Optional[int] = None) -> None:
    """ValueError listing every incompatibility on one line (the CLI's exit-2 error)."""
    found = problems(target, config, keys, max_lora_rank)
    if found:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(found, 1))
        raise ValueError(f"--target {target}: {len(found)} thing(s) {target} will not accept: {listed}")
