"""``model.quantization`` of the recipe: load the base quantized by bitsandbytes (QLoRA) and
prepare it for training adapters over it.

    model:
      quantization: {bits: 4, quant_type: nf4, compute_dtype: float32, quant_storage: uint8, double_quant: false}

Under fsdp1 / fsdp2 / zero3 ``quant_storage`` defaults to ``model.dtype``: the 4-bit codes are
packed into tensors of the model's dtype and shard like any other frozen weight (FSDP-QLoRA).

The base is loaded through transformers' ``BitsAndBytesConfig`` (the same path peft users take),
so ``PeftModel.from_pretrained`` over a base loaded with the same config reproduces the trained
model; with the built-in model the recipe first saves it to ``OUTPUT/base_model`` and loads that.
"""

from __future__ import annotations

import logging

import torch

from ..parallel.strategies import STRATEGIES
from .config import RecipeError

KEYS = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32", "quant_storage": "uint8", "double_quant": False}


def settings(cfg: dict) -> dict:
    """The quantization settings with defaults filled in, validated; errors name the key."""
    given = cfg["model"]["quantization"]
    if not isinstance(given, dict):
        raise RecipeError(f"model.quantization must be a mapping like {{bits: 4}}, got {given!r}")
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise RecipeError(f"unknown key 'model.quantization.{unknown[0]}' (keys: {', '.join(KEYS)})")
    q = {**KEYS, **given}
    # engines that shard parameters: the packed 4-bit weights shard with the rest when their
    # storage dtype is the model's (FSDP1 flat parameters need one dtype), so that is the default
    if "quant_storage" not in given and STRATEGIES[cfg["parallel"]["strategy"]].shards_parameters:
        q["quant_storage"] = cfg["model"]["dtype"]
    if q["bits"] not in (4, 8):
        raise RecipeError(f"model.quantization.bits must be 4 or 8, got {q['bits']!r}")
    if q["quant_type"] not in ("nf4", "fp4"):
        raise RecipeError(f"model.quantization.quant_type must be nf4 or fp4, got {q['quant_type']!r}")
    for key in ("compute_dtype", "quant_storage"):
        if not isinstance(getattr(torch, str(q[key]), None), torch.dtype):
            raise RecipeError(f"model.quantization.{key} must be a torch dtype name (float32, bfloat16, uint8...), "
                              f"got {q[key]!r}")
    strategy = cfg["parallel"]["strategy"]
    if not STRATEGIES[strategy].quantization:  # QLoRA verified under these (tests/test_quantized.py)
        verified = ", ".join(name for name, s in STRATEGIES.items() if s.quantization)
        raise RecipeError(f"model.quantization with parallel.strategy {strategy!r} is not supported; "
                          f"QLoRA runs under: {verified}")
    # bitsandbytes logs at import, on AVX512-BF16 CPUs, that an optional kernel for its repacked
    # eval path is missing; the recipe turns that path off (disable_cpu_repacking), so the line
    # would only be noise in front of the run's output and of one-line errors
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError("model.quantization needs bitsandbytes: pip install 'dist_adapters[quant]'") from None
    return q


def bnb_config(q: dict):
    from transformers import BitsAndBytesConfig

    if q["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["quant_type"],
                              bnb_4bit_compute_dtype=getattr(torch, q["compute_dtype"]),
                              bnb_4bit_quant_storage=getattr(torch, q["quant_storage"]),
                              bnb_4bit_use_double_quant=bool(q["double_quant"]))


def load_quantized(path: str, q: dict, dtype: torch.dtype, device: torch.device):
    """The model at ``path`` with its linear layers quantized, ready for adapter training: the
    CPU repacking trap disabled, layer norms and other float parameters in fp32 when the model
    dtype is half (as peft's prepare_model_for_kbit_training). Input gradients are not forced
    (peft's ``enable_input_require_grads``): that exists for reentrant checkpointing, and the
    recipe's checkpointing is non-reentrant."""
    from transformers import AutoModelForCausalLM

    from ..layers.quantized import disable_cpu_repacking

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(q), dtype=dtype,
                                                 device_map={"": device})
    disable_cpu_repacking(model)
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model


def config_source(q: dict) -> str:
    """``bnb_config(q)`` as Python source, for the "load it with peft" lines."""
    if q["bits"] == 8:
        return "BitsAndBytesConfig(load_in_8bit=True)"
    return (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={q['quant_type']!r}, "
            f"bnb_4bit_compute_dtype=torch.{q['compute_dtype']}, bnb_4bit_quant_storage=torch.{q['quant_storage']}, "
            f"bnb_4bit_use_double_quant={bool(q['double_quant'])})")
