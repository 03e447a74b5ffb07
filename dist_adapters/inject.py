"""Target matching and module surgery: ``da.inject(model, config, adapter_name)``.

Matching follows peft exactly (so the same config adapts the same modules):
- ``target_modules`` list: a module matches when its name equals an entry or ends with
  ``"." + entry``; ``layers_to_transform`` / ``layers_pattern`` then filter by layer index.
- ``target_modules`` str: ``re.fullmatch`` against the module name.
- ``"all-linear"``: every linear-kind module except the output head, expanded to full names and
  written back into the config (as peft does, so the saved JSON lists them).
- ``exclude_modules`` (list: name or suffix; str: fullmatch) and ``modules_to_save`` names are
  never given LoRA.
Unlike peft, an entry of ``target_modules`` that matches no module name at all is an error naming
the entry: a typo would otherwise train fewer layers than asked for, silently.

Which adapter layer wraps which base type is the dispatch table of ``layers/registry.py`` (most
specific class in the MRO wins); quantized and Megatron bases register there instead of editing
this file. Where an engine already holds the base partitioned (ZeRO-3's ``zero.Init``), the real
shapes and the rows trainable tokens start from come through the engine access
(``parallel/access.py``), never from the layers.
"""

from __future__ import annotations

import copy
import re
from typing import Optional

import torch
from torch import nn

from .config import LoraConfig, TrainableTokensConfig, get_pattern_key
from .control import adapter_configs, adapter_layers, unwrap
from .init.loftq import apply_loftq
from .init.pissa import apply_weight_init, is_weight_init
from .inject_parameters import convert_moe_targets, inject_parameters, moe_family
from .layers import dora, optional, registry
from .layers.lora import LoraEmbedding, LoraLinear
from .layers.modules_to_save import ModulesToSave
from .layers.registry import ADAPTER_LAYER_TYPES
from .layers.tokens import TiedTokensHead, TrainableTokensLayer
from .parallel import access

# peft's defaults for target_modules=None, for the architectures tests and users meet most.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"], "bloom": ["query_key_value"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gptj": ["q_proj", "v_proj"],
}


# ----------------------------------------------------------------------------- matching

def _suffix_match(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _layer_index_ok(config: LoraConfig, name: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    patterns = config.layers_pattern
    if not patterns:
        found = re.match(r".*\.[^.]*\.(\d+)\.", name)
    else:
        found = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            found = re.match(rf".*\.{pattern}\.(\d+)\.", name)
            if found:
                break
    if found is None:
        return False
    index = int(found.group(1))
    return index == wanted if isinstance(wanted, int) else index in wanted


def _is_excluded(config: LoraConfig, name: str) -> bool:
    excl = config.exclude_modules
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, name):
                return True
        elif any(_suffix_match(name, e) for e in excl):
            return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save or [])


def is_target(config: LoraConfig, name: str) -> bool:
    if _is_excluded(config, name):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    return any(name.endswith("." + t) for t in targets) and _layer_index_ok(config, name)


def _sample(names: list[str], k: int = 8) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    return ", ".join(leaves[:k]) + (", ..." if len(leaves) > k else "")


def _output_head_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def resolve_target_modules(model: nn.Module, config: LoraConfig, names: list[str]) -> None:
    """Fill in None / "all-linear" the way peft does, and check that every entry matches."""
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"LoraConfig.target_modules is None and model type {model_type!r} has no default; "
                f"set target_modules (e.g. 'all-linear'); some module names: {_sample(names)}"
            )
        config.target_modules = list(DEFAULT_TARGETS[model_type])
    family = moe_family(model)
    if family is not None:  # experts and routers are parameters in transformers v5 (inject_parameters.py)
        head, candidates = _output_head_name(model), set(names)
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                  if n and n != head and n in candidates and isinstance(m, registry.linear_kinds())}
        convert_moe_targets(config, family, leaves)
    if config.target_modules == "all-linear":
        head = _output_head_name(model)
        kinds = registry.linear_kinds()
        config.target_modules = sorted(
            n for n, m in model.named_modules() if n and n != head and isinstance(m, kinds)
        )
        if not config.target_modules:
            raise ValueError(f"target_modules='all-linear' found no linear layer in {type(model).__name__}")
        return
    if isinstance(config.target_modules, str):
        if not any(re.fullmatch(config.target_modules, n) for n in names):
            raise ValueError(
                f"target_modules regex {config.target_modules!r} matches no module name (full match) in "
                f"{type(model).__name__}; some module names: {_sample(names)}"
            )
        return
    for entry in config.target_modules:
        if not any(_suffix_match(n, entry) for n in names):
            raise ValueError(
                f"target_modules entry {entry!r} matches no module in {type(model).__name__}; "
                f"some module names: {_sample(names)}"
            )


# ----------------------------------------------------------------------------- surgery

def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _candidate_names(model: nn.Module) -> list[str]:
    """Module names, skipping everything inside an existing adapter layer (never nest adapters)."""
    inner: list[str] = [n + "." for n, _ in adapter_layers(model)]
    return [n for n, _ in model.named_modules(remove_duplicate=False)
            if n and not any(n.startswith(p) for p in inner)]


def _restart_dora(model: nn.Module, adapter_name: str, wrapper: nn.Module) -> None:
    """After an init that rewrote the base weights (LoftQ, PiSSA, OLoRA): DoRA magnitudes start at
    the new weight's norms, as peft initialises them after those inits."""
    for _, layer in adapter_layers(model):
        if adapter_name in (getattr(layer, "lora_magnitude_vector", None) or {}):
            with access.full_weights(layer, wrapper):
                dora.forget_weight(layer)
                layer.enable_dora(adapter_name)


def _inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> int:
    optional.load_for(model)
    names = _candidate_names(model)
    every_linear = config.target_modules == "all-linear"
    resolve_target_modules(model, config, names)
    for name in names:
        reason = registry.refusal_for(model.get_submodule(name))
        if reason and (every_linear or is_target(config, name)):
            raise NotImplementedError(f"{name}: {reason}")
    adapted = inject_parameters(model, config, adapter_name, names, _replace, access.full_shape)
    for name in list(dict.fromkeys(names)):
        if not is_target(config, name):
            continue
        module = model.get_submodule(name)
        if isinstance(module, ADAPTER_LAYER_TYPES):
            layer = module  # a second adapter on an already adapted layer
        else:
            factory = registry.factory_for(module)
            if factory is None:
                raise ValueError(
                    f"target module {name!r} is a {type(module).__name__}, which LoRA does not support "
                    f"(supported: {registry.supported_names()}); narrow target_modules"
                )
            weight = getattr(module, "weight", None)
            layer = factory(module, config, None if weight is None else tuple(access.full_shape(weight)))
            _replace(model, name, layer)
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern, name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, name), config.lora_alpha)
        layer.add_adapter(adapter_name, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                          use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
        if config.use_dora:  # the magnitude starts at the weight's norm: read it whole
            with access.full_weights(layer, model):
                layer.enable_dora(adapter_name)
        adapted += 1
    if adapted == 0:
        raise ValueError(
            f"no module or parameter of {type(model).__name__} was adapted: target_modules={config.target_modules!r} "
            f"matched only excluded modules or layers outside layers_to_transform={config.layers_to_transform!r}"
        )
    return adapted


def _inject_modules_to_save(model: nn.Module, entries: list[str], adapter_name: str) -> None:
    names = _candidate_names(model)
    for entry in entries:
        # peft's rule: the module name ends with the entry (no dot boundary), first wrapper wins.
        hits = [n for n in dict.fromkeys(names) if n.endswith(entry)]
        if not hits:
            raise ValueError(
                f"modules_to_save entry {entry!r} matches no module in {type(model).__name__}; "
                f"some module names: {_sample(names)}"
            )
        for name in hits:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _replace(model, name, module)
            if adapter_name not in module.adapter_names():
                module.add_adapter(adapter_name)


def token_targets(model: nn.Module, target_modules, indices, per_module: Optional[dict] = None) -> dict:
    """{embedding module name: token ids}. ``target_modules`` None means the input embedding;
    a list matches names or dotted suffixes, a str is a full-match regex (peft's rules)."""
    names = _candidate_names(model)
    if target_modules is None:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
        if name is None:
            name = next((n for n in names if _suffix_match(n, "embed_tokens")), None)
        if name is None:
            raise ValueError(f"no input embedding found in {type(model).__name__}: set target_modules")
        return {name: list(indices)}
    targets: dict[str, list[int]] = {}
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    for entry in entries:
        if isinstance(target_modules, str):
            hits = [n for n in names if re.fullmatch(entry, n)]
        else:
            hits = [n for n in names if _suffix_match(n, entry)]
        if not hits:
            raise ValueError(f"trainable tokens target {entry!r} matches no module in {type(model).__name__}; "
                             f"some module names: {_sample(names)}")
        for n in hits:
            targets[n] = list(per_module[entry] if per_module is not None else indices)
    return targets


def inject_tokens(model: nn.Module, targets: dict, adapter_name: str, init_weights: bool) -> None:
    """Wrap each target embedding in a TrainableTokensLayer (or add to it) and, when the output
    head shares the embedding's weight, wrap the head in a TiedTokensHead."""
    head_name = _output_head_name(model)
    head = model.get_submodule(head_name) if head_name else None
    for name, indices in targets.items():
        module = model.get_submodule(name)
        where = f"trainable tokens on {name!r}"
        if isinstance(module, LoraEmbedding):
            raise ValueError(f"{where}: the module is also a LoRA target; train it with LoRA or with "
                             "trainable tokens, not both")
        if not isinstance(module, TrainableTokensLayer):
            if not isinstance(module, nn.Embedding):
                raise ValueError(f"{where}: the module is a {type(module).__name__}; trainable tokens need "
                                 "an nn.Embedding")
            module = TrainableTokensLayer(module, shape=tuple(access.full_shape(module.weight)))
            _replace(model, name, module)
        module.check_indices(adapter_name, indices, where)
        module.add_adapter(adapter_name, indices, init_weights=init_weights,
                           original=_embedding_rows(module.base_layer, indices, model))
        if head is not None and not isinstance(head, TiedTokensHead) and \
                getattr(head, "weight", None) is module.base_layer.weight:
            _replace(model, head_name, TiedTokensHead(head, module))


@torch.no_grad()
def _embedding_rows(embedding: nn.Module, indices: list[int], model: nn.Module) -> torch.Tensor:
    """Rows ``indices`` of the embedding weight, gathered where an engine holds it partitioned."""
    with access.full_weights(embedding, model):
        weight = embedding.weight
        return weight[torch.tensor(indices, device=weight.device)].detach().clone()


def _mark_trainable(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    active = model.__dict__.get("_da_active") or adapter_name
    model.__dict__["_da_active"] = active
    for _, layer in adapter_layers(model):
        layer.set_adapter([active])
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in adapter_layers(model):
            layer_bias = getattr(getattr(layer, "base_layer", None), "bias", None)
            if isinstance(layer, (LoraLinear, LoraEmbedding)) and layer_bias is not None:
                layer_bias.requires_grad_(True)


def inject(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Swap adapter layers into ``model`` in place, freeze the base, return ``model``.

    The first adapter injected is active (runs and trains); later ones are added frozen and idle
    until ``da.set_adapter``. ``config`` is stored on the model (``da.save_adapter`` writes it).
    """
    inner = unwrap(model)
    configs = adapter_configs(inner)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists on this model; pick another adapter_name")
    if not isinstance(config, (LoraConfig, TrainableTokensConfig)):
        raise TypeError(f"config must be a da.LoraConfig or da.TrainableTokensConfig, got {type(config).__name__}")
    config = copy.deepcopy(config)  # resolved below (all-linear, fan_in_fan_out); the caller's stays as given
    if isinstance(config, TrainableTokensConfig):
        targets = token_targets(inner, config.target_modules, config.token_indices)
        inject_tokens(inner, targets, adapter_name, config.init_weights)
    else:
        _inject_lora(inner, config, adapter_name)
        if config.init_lora_weights == "loftq":  # base weights become Q, factors LoftQ's (init/loftq.py)
            apply_loftq(inner, config, adapter_name, wrapper=model)
            _restart_dora(inner, adapter_name, model)
        elif is_weight_init(config.init_lora_weights):  # PiSSA / OLoRA: the base becomes the residual
            apply_weight_init(inner, config, adapter_name, wrapper=model)
            _restart_dora(inner, adapter_name, model)
        if config.modules_to_save:
            _inject_modules_to_save(inner, list(config.modules_to_save), adapter_name)
        if config.trainable_token_indices is not None:
            tti = config.trainable_token_indices
            targets = (token_targets(inner, list(tti), None, per_module=tti) if isinstance(tti, dict)
                       else token_targets(inner, None, list(tti)))
            inject_tokens(inner, targets, adapter_name, init_weights=True)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(inner, "config", None), "_name_or_path", None) or None
    configs[adapter_name] = config
    _mark_trainable(inner, config, adapter_name)
    return model
