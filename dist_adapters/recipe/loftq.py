"""``adapter.init_lora_weights: loftq`` in the recipe.

LoftQ changes the base: its weights become Q (W quantized and dequantized) and the adapter starts
at the low-rank part of W - Q. An adapter trained that way is only right over Q, so the recipe
saves Q as ``OUTPUT/base_model`` (also when ``model.path`` is given: that directory keeps W) and
points ``base_model_name_or_path`` at it. With ``model.quantization`` the base is then loaded from
there through bitsandbytes: Q lies on the nf4 grid, so quantizing it again gives Q back and the
LoftQ correction holds on the 4-bit model (tests/test_loftq.py checks it).

Every rank computes LoftQ, rank 0 writes both directories, and every rank continues from those
files (identical factors everywhere, whatever the thread count or device of each rank).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..checkpoint.peft_format import load_adapter, save_adapter
from ..config import LoraConfig
from ..control import adapter_configs
from ..inject import inject
from ..merge import unload
from ..process_group import barrier
from . import quantization
from .config import RecipeError


def wants_loftq(adapter_cfg) -> bool:
    return isinstance(adapter_cfg, LoraConfig) and adapter_cfg.init_lora_weights == "loftq"


def check(cfg: dict, adapter_cfg: LoraConfig) -> None:
    """With ``model.quantization`` the 4-bit base must reproduce Q: nf4, no double quantization
    (it would round the block scales again), LoftQ at 4 bits. Errors name the keys."""
    q = cfg["model"]["quantization"]
    if q is None:
        return
    q = {**quantization.KEYS, **q}  # a mapping: preflight ran quantization.settings before this
    bits = adapter_cfg.loftq_config.loftq_bits
    if q["bits"] != 4 or q["quant_type"] != "nf4" or q["double_quant"] or bits != 4:
        raise RecipeError("adapter.init_lora_weights: loftq with model.quantization needs bits: 4, quant_type: nf4, "
                          f"double_quant: false and adapter.loftq_config.loftq_bits: 4 (got bits {q['bits']}, "
                          f"quant_type {q['quant_type']}, double_quant {q['double_quant']}, loftq_bits {bits}): "
                          "only then does the quantized base reproduce LoftQ's Q")


def loftq_start(cfg: dict, model, tokenizer, adapter_cfg: LoraConfig, dist):
    """LoftQ on the full-precision ``model``; returns the model to train (quantized when
    ``model.quantization`` is set) with the adapter injected at LoftQ's factors. Writes
    ``OUTPUT/base_model`` (Q) and ``OUTPUT/loftq_init`` (the initial PEFT adapter)."""
    out = cfg["train"]["output_dir"]
    base_dir = os.path.abspath(os.path.join(out, "base_model"))
    init_dir = os.path.abspath(os.path.join(out, "loftq_init"))
    inject(model, adapter_cfg)  # base weights -> Q, factors -> LoftQ's (init/loftq.py, one layer at a time)
    # saved as a plain LoRA init: peft would otherwise run its own (CUDA-only) LoftQ on load
    configs = adapter_configs(model)
    configs["default"] = dataclasses.replace(configs["default"], init_lora_weights=True, loftq_config={},
                                             base_model_name_or_path=base_dir)
    save_adapter(model, init_dir)  # collective; rank 0's factors are written
    unload(model, merge=False)  # the plain model, Q in place of each targeted W
    if dist.is_main:
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    barrier()
    # every rank continues from rank 0's files, not from its own result: float rounding in the
    # matmuls depends on thread count and device, and LoftQ's rounding to the grid amplifies it
    dtype = getattr(torch, cfg["model"]["dtype"])
    if cfg["model"]["quantization"] is not None:
        model = quantization.load_quantized(base_dir, quantization.settings(cfg), dtype, dist.device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    load_adapter(model, init_dir)
    return model
