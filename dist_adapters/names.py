"""Every name convention in one place: engine wrapper names, and the PEFT checkpoint format's file
names, key prefix and key mapping. Torch-free and import-free, so the offline readers
(``checkpoint/consolidate.py``) use exactly the mapping that save / load use.

Parameter names as engines and libraries write them:

    model.layers.0.q_proj.lora_A.default.weight                          dist_adapters
    base_model.model.model.layers.0.q_proj.lora_A.default.weight         peft (in memory)
    _fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.q_proj...   FSDP1 with use_orig_params
    _checkpoint_wrapped_module. / _orig_mod. (torch.compile) / module.   wrappers
    model.base_model.model....                                           accelerate's DCP layout ("model" outer key)

Our in-memory names and peft's file keys (the PEFT checkpoint format):

    ours (in memory)                                  peft file
    <m>.lora_A.<adapter>.weight                       base_model.model.<m>.lora_A.weight
    <m>.lora_B.<adapter>.weight                       base_model.model.<m>.lora_B.weight
    <m>.lora_embedding_A.<adapter>.weight             base_model.model.<m>.lora_embedding_A
    <m>.lora_embedding_B.<adapter>.weight             base_model.model.<m>.lora_embedding_B
    <m>.lora_magnitude_vector.<adapter>.weight        base_model.model.<m>.lora_magnitude_vector (DoRA)
    <m>.modules_to_save.<adapter>.<rest>              base_model.model.<m>.<rest>
    <m>.base_layer.bias / <m>.bias (bias=all|lora_only) base_model.model.<m>.base_layer.bias / ...
    <m>.trainable_tokens_delta.<adapter>.weight       base_model.model.<m>.trainable_tokens_delta (standalone)
                                                      base_model.model.<m>.token_adapter.trainable_tokens_delta (with LoRA)
"""

from __future__ import annotations

import re
from typing import Optional

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
MEGATRON_SHARDS_NAME = "shards.json"  # per TP rank in a save_megatron_shards directory

# Name segments that engine wrappers insert into parameter names (FSDP1, activation
# checkpointing, torch.compile), and wrapper classes that hold the real model in ``.module``
# without adding to its names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
WRAPPER_CLASSES = frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine",
                             "FullyShardedDataParallel"})
# Wrappers whose own forward only adds gradient bookkeeping around ``.module``'s: a forward that
# must not be collective (checkpoint/verification.py's probe) calls the module inside.
FORWARD_THROUGH_MODULE = frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"})
# Wrappers that hold the real model under another attribute (and add it to parameter names).
WRAPPER_ATTRIBUTES = {"OptimizedModule": "_orig_mod", "CheckpointWrapper": "_checkpoint_wrapped_module"}
# Packages whose classes an engine generates or puts around a model (FSDP2's ``FSDP<Model>``
# subclass, compiled and checkpoint wrappers): never the class a model directory is loaded with.
ENGINE_PACKAGES = ("torch.distributed.", "torch._dynamo.", "deepspeed.")

_LORA_FACTOR = re.compile(r"^(?P<m>.+)\.(?P<kind>lora_A|lora_B)\.(?P<a>[^.]+)\.weight$")
_EMB_FACTOR = re.compile(r"^(?P<m>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                         r"\.(?P<a>[^.]+)\.weight$")
_SAVED_COPY = re.compile(r"^(?P<m>.+)\.modules_to_save\.(?P<a>[^.]+)\.(?P<rest>.+)$")
_TOKEN_ROWS = re.compile(r"^(?P<m>.+)\.trainable_tokens_delta\.(?P<a>[^.]+)\.weight$")
_PEFT_TOKEN_ROWS = re.compile(r"^(?P<m>.+?)(?P<wrap>\.token_adapter)?\.trainable_tokens_delta$")

_SPELLINGS = [  # peft's in-memory names -> ours
    (re.compile(r"^(.+)\.(lora_embedding_[AB]|lora_magnitude_vector)\.([^.]+)$"), r"\1.\2.\3.weight"),
    (re.compile(r"^(.+?)(?:\.token_adapter)?\.trainable_tokens_delta\.([^.]+)(?:\.weight)?$"),
     r"\1.trainable_tokens_delta.\2.weight"),
]
_ADAPTER = re.compile(r"\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|"
                      r"trainable_tokens_delta|modules_to_save)"
                      r"\.([^.]+)\.")


def clean_name(name: str) -> str:
    """A parameter or module name without FSDP1 / checkpoint / torch.compile wrapper segments."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def token_prefix(with_lora: bool) -> str:
    """peft nests trainable tokens under ``token_adapter`` when they come with LoRA."""
    return "token_adapter." if with_lora else ""


def to_peft_key(key: str, adapter_name: str, prefix: str = "") -> Optional[str]:
    """Our parameter name -> peft's file key, or None when the key belongs to another adapter
    or is not an adapter tensor at all. ``prefix``: ``token_prefix(...)``."""
    found = _TOKEN_ROWS.match(key)
    if found:
        return PREFIX + f"{found['m']}.{prefix}trainable_tokens_delta" if found["a"] == adapter_name else None
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
    for kind in ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        if key.endswith(f".{kind}"):
            return f"{key}.{adapter_name}.weight"
    for module in copies:
        if key.startswith(module + "."):
            return f"{module}.modules_to_save.{adapter_name}.{key[len(module) + 1:]}"
    return key


def normalise(name: str, outer_prefix: str = "") -> str:
    """Any engine's or library's spelling of a parameter name -> our module path: drops an outer
    prefix (accelerate's ``model.``), wrapper segments, a leading DDP ``module.`` and peft's
    ``base_model.model.``."""
    if outer_prefix and name.startswith(outer_prefix):
        name = name[len(outer_prefix):]
    name = clean_name(name)
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    return name


def ours(name: str) -> Optional[tuple[str, str]]:
    """(our parameter name, adapter name) for an adapter tensor's normalised name, else None.
    Rewrites peft's in-memory spellings (ParameterDict entries have no ``.weight``; trainable
    tokens sit under ``token_adapter``)."""
    for pattern, replacement in _SPELLINGS:
        name = pattern.sub(replacement, name)
    found = _ADAPTER.findall(name)
    if not found or to_peft_key(name, found[-1]) is None:
        return None
    return name, found[-1]


def module_of(key: str) -> str:
    """``base_model.model.<m>.lora_A.weight`` -> ``<m>`` (for LoRA and token keys)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for tail in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector",
                 ".token_adapter.trainable_tokens_delta", ".trainable_tokens_delta"):
        if key.endswith(tail):
            return key[: -len(tail)]
    return key
