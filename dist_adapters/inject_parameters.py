"""``LoraConfig.target_parameters``: which parameters get LoRA, as peft 0.21.2 decides it.

- A parameter matches an entry when ``<module name>.<parameter name>`` equals it or ends with
  ``"." + entry``; an entry that matches no parameter is an error naming it (as for modules).
- The parameters of one module are wrapped in their registration order, the first innermost
  (``layers/experts.py``), so the saved keys are peft's.
- Mixture-of-experts families whose transformers v5 layout fused the v4 per-expert ``nn.Linear``
  layers (``transformers.conversion_mapping``: Mixtral-style and Qwen2-MoE-style, e.g. Mixtral,
  Qwen3-MoE, OLMoE, DeepSeek-V3) get peft's rewrite of the config: the v4 names (``w1``/``w3``/``w2``
  or ``gate_proj``/``up_proj``/``down_proj``, and the router ``gate``) move from target_modules to
  target_parameters (``gate_up_proj``, ``down_proj``, ``gate.weight``), and a fused pair doubles
  the rank and alpha of ``gate_up_proj`` (``rank_pattern`` / ``alpha_pattern``). So
  ``"all-linear"`` adapts the experts and the router, and, as in peft, not the dense MLPs or
  shared experts that carry the same leaf names.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .config import LoraConfig, get_pattern_key
from .layers.experts import LoraParameter
from .layers.registry import ADAPTER_LAYER_TYPES

# transformers v4 -> v5 names of the fused MoE families (the same tables peft 0.21.2 uses)
_MOE_TARGETS = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
_MOE_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


def moe_family(model: nn.Module) -> Optional[str]:
    """"mixtral" / "qwen2_moe" for a model whose MoE layout transformers v5 converted, else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:
        return None
    family = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}.get(model_type)
    if family not in _MOE_TARGETS or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return family


def convert_moe_targets(config: LoraConfig, family: str, linear_leaves: set[str]) -> None:
    """peft's config rewrite for a converted MoE family (in place). ``linear_leaves``: the last
    names of the model's linear layers, what ``"all-linear"`` stands for."""
    mapping, fused = _MOE_TARGETS[family], _MOE_FUSED[family]
    targets = config.target_modules
    if isinstance(targets, str):
        if targets != "all-linear":
            return  # a regex names what it means: left as it is
        targets = linear_leaves | set(mapping)
    parameters = set(config.target_parameters or [])
    remaining, present = set(), {name: set() for name in fused}
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith("." + o)), None)
        if old is None:
            remaining.add(target)
            continue
        parameters.add(mapping[old])
        present.setdefault(mapping[old], set()).add(old)
    for new, group in fused.items():
        if 0 < len(present[new]) < len(group):
            missing = sorted(set(group) - present[new])
            raise ValueError(f"target_modules {sorted(present[new])} of this model are fused into {new} with "
                             f"{missing}: target those too")
        if len(present[new]) == len(group):
            config.rank_pattern[rf".*\.{re.escape(new)}"] = config.r * len(group)
            config.alpha_pattern[rf".*\.{re.escape(new)}"] = config.lora_alpha * len(group)
    config.target_parameters = sorted(parameters)
    config.target_modules = sorted(remaining)


def parameter_targets(model: nn.Module, config: LoraConfig, names: list[str]) -> dict[str, list[str]]:
    """{module name: its targeted parameter names, in registration order}."""
    entries = sorted(config.target_parameters or [])
    found: dict[str, list[str]] = {}
    hit: set[str] = set()
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoraParameter):
            module = module.target_module
        elif isinstance(module, ADAPTER_LAYER_TYPES):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{name}.{pname}"
            match = next((e for e in entries if key == e or key.endswith("." + e)), None)
            if match is not None:
                found.setdefault(name, []).append(pname)
                hit.add(match)
    missing = [e for e in entries if e not in hit]
    if missing:
        raise ValueError(f"target_parameters entry {missing[0]!r} matches no parameter in {type(model).__name__}")
    return found


def inject_parameters(model: nn.Module, config: LoraConfig, adapter_name: str, names: list[str], replace,
                      full_shape) -> int:
    """Wrap every targeted parameter (or reuse its wrapper) and add the adapter; returns the count.
    ``replace(model, name, module)`` swaps a module in; ``full_shape(tensor)`` is the engine's."""
    count = 0
    for name, params in parameter_targets(model, config, names).items():
        for pname in params:
            outer = model.get_submodule(name)
            layer = next((m for m in (outer.chain() if isinstance(outer, LoraParameter) else [])
                          if m.parameter_name == pname), None)
            if layer is None:
                base = outer.target_module if isinstance(outer, LoraParameter) else outer
                layer = LoraParameter(outer, pname, shape=tuple(full_shape(getattr(base, pname))))
                replace(model, name, layer)
            key = f"{name}.{pname}"
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern, key), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, key), config.lora_alpha)
            layer.add_adapter(adapter_name, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                              use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
            if config.use_dora:
                layer.enable_dora(adapter_name)
            count += 1
    return count
