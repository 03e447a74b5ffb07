"""The PEFT checkpoint format, both ways. The key mapping (our parameter names <-> peft's file
keys, with its table) lives once in ``names.py`` (``to_peft_key`` / ``from_peft_key``, torch-free
for the offline readers); every tensor is read and written through the engine access
(``parallel/access.py``), so save and load work under every engine (rule 4 of
docs/architecture.md).

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the
older ``adapter_model.bin``); a non-default adapter is saved in ``<dir>/<adapter_name>/``.

A tied output head's token rows are the embedding's and are saved once, under the embedding.
peft's standalone trainable tokens also write ``<head>.trainable_tokens_delta`` for a tied head;
on load that duplicate is checked against the embedding's rows and otherwise skipped.

peft also writes full embedding weights when an embedding is targeted
(``<m>.base_layer.weight``, ``lm_head.weight``); those load into the base weights, as in peft.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import CONFIG_NAME, LoraConfig, load_config
from ..control import adapter_configs, adapter_layers, get_config, model_class, unwrap
from ..inject import inject
from ..layers.tokens import TiedTokensHead
from ..names import LEGACY_WEIGHTS_NAME, PREFIX, WEIGHTS_NAME, clean_name, from_peft_key, to_peft_key, token_prefix
from ..parallel.access import adapter_params, base_tensor_refusal, full_shape, read_full, write_full
from ..process_group import barrier, rank
from .atomic import atomic_path
from .manifest import check_tensors, tensor_manifest
from .verification import record
from .verification import write as write_verification


def _token_prefix(config) -> str:
    return token_prefix(isinstance(config, LoraConfig))


def _bias_keys(model: nn.Module, config) -> set[str]:
    """Clean names of the biases peft saves for ``bias="all"`` / ``"lora_only"``."""
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return set()
    refusal = base_tensor_refusal(model)
    if refusal:  # "ENGINE: why; what instead"
        raise NotImplementedError(f"bias={bias!r} under {refusal} or bias='none'")
    names = [clean_name(n) for n, _ in unwrap(model).named_parameters()]
    if bias == "all":
        # the copies of modules_to_save are saved whole; their biases are not listed twice
        return {n for n in names if (n == "bias" or n.endswith(".bias"))
                and ".modules_to_save." not in n and ".original_module." not in n}
    layers = {f"{clean_name(name)}.base_layer.bias" for name, layer in adapter_layers(model)}
    return layers & set(names)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's keys (CPU, contiguous, full-size copies).

    Collective under FSDP / DTensor engines: every rank must call it; each rank gets the tensors.
    Only adapter tensors are gathered, one unit or tensor at a time."""
    config = get_config(model, adapter_name)
    prefix = _token_prefix(config)
    biases = _bias_keys(model, config)
    out: dict[str, torch.Tensor] = {}
    for name, param in adapter_params(model, lambda n: to_peft_key(n, adapter_name, prefix) is not None or n in biases):
        key = to_peft_key(name, adapter_name, prefix) or PREFIX + name
        out[key] = read_full(param).detach().to("cpu").contiguous().clone()
    return dict(sorted(out.items()))


def _auto_mapping(model: nn.Module) -> dict:
    """What peft's ``AutoPeftModel*`` import the base model with: its own class, not an engine's."""
    cls = model_class(model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def save_adapter(model: nn.Module, path: str, adapter_name: str = "default",
                 convert_from: Optional[str] = None, engine: Optional[str] = None, probe: bool = True) -> str:
    """Write a PEFT directory; a non-default adapter goes to ``path/<adapter_name>`` as peft does.

    ``convert_from``: the PEFT directory of this PiSSA / OLoRA adapter at its start (as peft's
    ``path_initial_model_for_weight_conversion``): writes instead the plain LoRA of rank 2r that
    gives the trained model on the original base (``init/pissa.py: convert_to_lora``).

    Also writes ``verification.json`` (checkpoint/verification.py): every tensor's sha256 and,
    when this is the model's only adapter, the live model's logits on a fixed probe batch, which
    ``dist-adapters verify`` reproduces in a fresh process. ``engine``: how the model runs, for
    that record (the recipe passes its strategy; default: told from the wrappers). The probe is
    one eval forward of the model as it runs (under FSDP / ZeRO-3 it gathers unit by unit, as a
    training forward does); ``probe=False`` records the tensors only.

    Collective-safe: every rank computes the state dict and runs the probe, only rank 0 writes;
    the weights file is written first and the config last, each atomically, so a directory with
    a config is complete. Returns the directory written.
    """
    inner = unwrap(model)
    config = get_config(inner, adapter_name)
    tensors = adapter_state_dict(model, adapter_name)
    if not tensors:
        raise RuntimeError(f"adapter {adapter_name!r} has no tensors to save")
    if convert_from is not None:
        from ..init.pissa import convert_to_lora, converted_config

        tensors = convert_to_lora(tensors, read_adapter_weights(convert_from)[0])
        config = converted_config(config)
    out_dir = path if adapter_name == "default" else os.path.join(path, adapter_name)
    probe = probe and convert_from is None and len(adapter_configs(inner)) == 1  # this adapter's logits alone
    verification = record(model, tensors, engine, probe, config.base_model_name_or_path)
    if rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_path(os.path.join(out_dir, WEIGHTS_NAME)) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt", **tensor_manifest(tensors)})
        write_verification(out_dir, verification)
        overrides = {"inference_mode": True}  # what peft records on save
        if config.task_type is None and config.auto_mapping is None:
            overrides["auto_mapping"] = _auto_mapping(inner)
        config.save(out_dir, **overrides)
    barrier()
    return out_dir


def read_adapter_weights(directory: str) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a PEFT directory (safetensors, or .bin read with weights_only=True) and the file.
    A safetensors file we wrote carries each tensor's sha256 (checkpoint/manifest.py): checked
    here, a CheckpointError naming the key on a mismatch."""
    st_path = os.path.join(directory, WEIGHTS_NAME)
    bin_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            with safe_open(st_path, framework="pt") as fh:
                metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{st_path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
        check_tensors(tensors, metadata, st_path)  # when written by us: every tensor's sha256
        return tensors, st_path
    if os.path.isfile(bin_path):
        try:
            data = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise ValueError(f"{bin_path}: not a readable weights-only torch file (truncated, corrupt, "
                             f"or holding objects other than tensors): {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ValueError(f"{bin_path}: expected a dict of tensors")
        return data, bin_path
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {directory!r}")


def _resolve_dir(path: str, adapter_name: str) -> str:
    sub = os.path.join(path, adapter_name)
    if adapter_name != "default" and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    return path


@torch.no_grad()
def load_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT directory into ``model``: inject from its adapter_config.json when the model has
    no adapter of that name yet, then copy every tensor in, checking keys and shapes."""
    directory = _resolve_dir(path, adapter_name)
    tensors, file = read_adapter_weights(directory)
    inner = unwrap(model)
    if adapter_name not in adapter_configs(inner):
        config = load_config(directory)
        if isinstance(config, LoraConfig) and config.init_lora_weights == "loftq":
            # the file holds the trained weights; LoftQ's init would only be overwritten
            config = dataclasses.replace(config, init_lora_weights=True, loftq_config={})
        inject(inner, dataclasses.replace(config, inference_mode=False), adapter_name)
    copies = {clean_name(name) for name, layer in adapter_layers(inner) if hasattr(layer, "original_module")}
    layer_name = {id(layer): clean_name(name) for name, layer in adapter_layers(inner)}
    tied = {clean_name(name): layer_name[id(layer._tokens[0])] for name, layer in adapter_layers(inner)
            if isinstance(layer, TiedTokensHead)}  # head module -> its embedding module
    prefix = _token_prefix(get_config(inner, adapter_name))
    names = {clean_name(n) for n, _ in unwrap(model).named_parameters()}
    incoming: dict[str, tuple[str, torch.Tensor]] = {}  # our clean name -> (file key, tensor)
    duplicates: list[tuple[str, torch.Tensor, str]] = []
    for key, tensor in tensors.items():
        ours = from_peft_key(key, adapter_name, copies)
        module = ours.rsplit(".trainable_tokens_delta.", 1)[0]
        if module in tied:  # peft's second copy of a tied head's rows: checked below, not loaded
            duplicates.append((key, tensor, f"{tied[module]}.trainable_tokens_delta.{adapter_name}.weight"))
            continue
        if ours not in names and ours.endswith(".weight") and f"{ours[:-7]}.base_layer.weight" in names:
            ours = f"{ours[:-7]}.base_layer.weight"  # peft saved the un-wrapped name of a base weight
        incoming[ours] = (key, tensor)
    for key, tensor, twin in duplicates:
        if twin not in incoming:
            incoming[twin] = (key, tensor)
        elif not torch.equal(tensor, incoming[twin][1]):
            raise ValueError(f"{file}: key {key!r} (tied output head) differs from {incoming[twin][0]!r}")
    missing, loaded = [], set()
    wanted = lambda n: n in incoming or to_peft_key(n, adapter_name, prefix) is not None  # noqa: E731
    for name, param in adapter_params(model, wanted, writeback=True):
        if name not in incoming:
            missing.append(to_peft_key(name, adapter_name, prefix))
            continue
        key, tensor = incoming[name]
        if tensor.shape != full_shape(param):  # a DTensor's, a gathered ZeRO-3 / FSDP1 one, a TP shard's full one
            raise ValueError(f"{file}: key {key!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(full_shape(param))}")
        write_full(param, tensor)
        loaded.add(name)
    unknown = sorted(incoming[n][0] for n in set(incoming) - loaded)
    if unknown:
        raise ValueError(f"{file}: key {unknown[0]!r} matches no parameter of the model "
                         f"(adapter {adapter_name!r}); is this adapter for another architecture?")
    if missing:
        raise ValueError(f"{file}: adapter {adapter_name!r} is missing {len(missing)} tensor(s), "
                         f"e.g. {sorted(missing)[:3]}")
    return model

