"""``adapter.init_lora_weights: loftq`` (and ``pissa``, ``pissa_niter_K``, ``olora``) in the recipe.

LoftQ changes the base: its weights become Q (W quantized and dequantized) and the adapter starts
at the low-rank part of W - Q. PiSSA and OLoRA change it too: the base becomes the residual
W - s B A (init/pissa.py). An adapter trained that way is only right over that base, so the recipe
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
from ..init.pissa import is_weight_init
from ..control import adapter_configs
from ..inject import inject
from ..merge import unload
from ..process_group import barrier
from . import quantization
from .config import RecipeError


def wants_loftq(adapter_cfg) -> bool:
    return isinstance(adapter_cfg, LoraConfig) and adapter_cfg.init_lora_weights == "loftq"


def changes_base(adapter_cfg) -> bool:
    """LoftQ, PiSSA or OLoRA: the initialisation rewrites the base weights."""
    return wants_loftq(adapter_cfg) or (isinstance(adapter_cfg, LoraConfig)
                                        and is_weight_init(adapter_cfg.init_lora_weights))


def init_dir_name(adapter_cfg: LoraConfig) -> str:
    """``loftq_init``, ``pissa_init`` or ``olora_init``: the initial adapter, kept for peft's
    conversion to a plain LoRA on the original base (``da.save_adapter(..., convert_from=)``)."""
    return adapter_cfg.init_lora_weights.split("_niter_")[0] + "_init"


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
    """LoftQ (or PiSSA, OLoRA) on the full-precision ``model``; returns the model to train
    (quantized when ``model.quantization`` is set) with the adapter injected at its initial
    factors. Writes ``OUTPUT/base_model`` (Q, or the residual) and ``OUTPUT/<method>_init`` (the
    initial PEFT adapter)."""
    out = cfg["train"]["output_dir"]
    base_dir = os.path.abspath(os.path.join(out, "base_model"))
    init_dir = os.path.abspath(os.path.join(out, init_dir_name(adapter_cfg)))
    inject(model, adapter_cfg)  # base weights -> Q or the residual, factors -> the method's (one layer at a time)
    # saved as a plain LoRA init: peft would otherwise run its own LoftQ / PiSSA on load (and
    # rewrite the base it loads onto)
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
    if dist.is_main:
        print(f"{adapter_cfg.init_lora_weights}: the base the adapter trains on is {base_dir}; the initial adapter "
              f"is {init_dir}", flush=True)
    return model
