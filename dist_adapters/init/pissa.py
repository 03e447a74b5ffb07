"""PiSSA and OLoRA: ``init_lora_weights="pissa"``, ``"pissa_niter_K"`` and ``"olora"``, as peft
0.21.2 defines them. The factors start at the weight's principal part and the base weight becomes
the residual, so the adapted model is the base model at step 0:

    PiSSA:  W = U S V^T,  A = sqrt(S_r / s) V_r^T,  B = U_r sqrt(S_r / s)   (niter: torch.svd_lowrank)
    OLoRA:  W = Q R,      A = R[:r],                B = Q[:, :r]
    both:   W <- W - s B A

(W as [out, in]: a Conv1D weight is transposed first.) Each layer's weight is read and written
whole inside the engine's ``full_weights`` (parallel/access.py), so partitioned, sharded or
replicated bases get the residual and their master copies with it.

``convert_to_lora``: as peft's ``path_initial_model_for_weight_conversion``, a trained adapter
minus its initial one is a plain LoRA of rank 2r on the original base,
``B A - B0 A0 = [B | -B0] [A ; A0]`` (rank and alpha doubled, so the scaling stays).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..control import adapter_layers
from ..layers import dora
from ..layers.lora import LoraLinear
from ..parallel.access import full_weights


def is_weight_init(value) -> bool:
    """Whether ``init_lora_weights`` names PiSSA or OLoRA."""
    if value in ("pissa", "olora"):
        return True
    if isinstance(value, str) and value.startswith("pissa_niter_"):
        return value[len("pissa_niter_"):].isdigit()
    return False


def factors(weight: torch.Tensor, r: int, scaling: float, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of ``weight`` [out, in] for ``how`` (pissa / pissa_niter_K / olora)."""
    if how == "olora":
        q, rr = torch.linalg.qr(weight)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if how == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, r, niter=int(how[len("pissa_niter_"):]))
        vh = v.T
    root = torch.sqrt(s / scaling)
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def apply_weight_init(model: nn.Module, config, adapter_name: str, wrapper: Optional[nn.Module] = None) -> int:
    """``inject``'s PiSSA / OLoRA: for every LoraLinear of ``adapter_name``, factors from its weight
    and the weight made the residual, one layer at a time inside the engine's ``full_weights``."""
    from tqdm.auto import tqdm

    how = config.init_lora_weights
    layers = []
    for name, layer in adapter_layers(model):
        if adapter_name not in getattr(layer, "r", {}):
            continue
        if not isinstance(layer, LoraLinear) or not torch.is_floating_point(layer.base_layer.weight) or type(
                layer.base_layer).__module__.startswith("bitsandbytes"):
            raise ValueError(f"init_lora_weights={how!r} runs on unquantized linear layers (nn.Linear, Conv1D); "
                             f"{name!r} is a {type(layer.base_layer).__name__}: leave it out of target_modules")
        layers.append((name, layer))
    for _, layer in tqdm(layers, desc=how, disable=None):
        with full_weights(layer, wrapper or model), torch.no_grad():
            weight = layer.base_layer.weight
            # float64: the factors must not depend on the thread count (an fp32 SVD on 1 and on 2
            # threads differs by 3e-5 in the factors, docs/field-notes.md), as ranks and a
            # single process run with different counts
            w = (weight.T if layer.fan_in_fan_out else weight).double()
            scaling = layer.scaling[adapter_name]
            a, b = factors(w, layer.r[adapter_name], scaling, how)
            residual = w - scaling * (b @ a)
            weight.data.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))
            layer.lora_A[adapter_name].weight.data.copy_(a)
            layer.lora_B[adapter_name].weight.data.copy_(b)
            dora.forget_weight(layer)
    return len(layers)


def convert_to_lora(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT tensors of a PiSSA / OLoRA adapter after training, and at its start -> a plain LoRA of
    twice the rank for the original base. Other tensors (tokens, saved copies) are kept."""
    missing = sorted(k for k in trained if (".lora_A." in k or ".lora_B." in k) and k not in initial)
    if missing:
        raise ValueError(f"the initial adapter has no {missing[0]}: not the adapter this one started from")
    if any(k.endswith(".lora_magnitude_vector") for k in trained):
        raise ValueError("a DoRA adapter cannot be converted to a plain LoRA (its magnitude scales the base)")
    out = {}
    for key, value in trained.items():
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:
            out[key] = value
    return out


def converted_config(config):
    """The config of ``convert_to_lora``'s adapter: rank and alpha doubled (rsLoRA: alpha times
    sqrt 2), patterns too, plain init."""
    import copy

    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2 ** 0.5 if config.use_rslora else 2
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return config
