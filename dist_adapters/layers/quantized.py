"""LoRA over bitsandbytes quantized linear layers (QLoRA): ``Linear4bit`` (nf4 / fp4, double
quant, any compute dtype and quant_storage) and ``Linear8bitLt``.

The frozen base runs as bitsandbytes runs it; the LoRA factors are ordinary fp32 ``LoraFactor``
leaves (rule 1 of docs/architecture.md), so forward is ``base(x) + B(A(dropout(x)) * s)``
exactly as in ``LoraLinear``. Imported by ``layers/optional.py`` when a model holds
``bitsandbytes`` modules.

Merge / unmerge dequantize the base weight, add or subtract the delta and quantize again: the
result carries a second rounding (a warning says so), and unmerge does not restore the original
codes bit for bit, as in peft.

The CPU packing trap (docs/field-notes.md): on CPUs with AVX512-BF16, a 4-bit forward in eval mode with
an input that does not require grad repacks the weight permanently into a layout that has no
autograd (later training gets wrong or missing input gradients) and fails outright for
in_features < blocksize. ``disable_cpu_repacking`` turns that path off per module; wrapping a
layer here does it, and the recipe does it for every ``Linear4bit`` of a quantized model.
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import torch
from torch import nn

from .lora import AdapterLayer, LoraLinear
from .registry import register_lora_layer


def disable_cpu_repacking(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU weight repacking on every ``Linear4bit`` of ``model``; returns
    how many were changed. Call before any eval forward of a model that will train."""
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a float tensor [out, in] (fp32)."""
    weight = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(base, bnb.nn.Linear8bitLt):
        # after its first forward the layer keeps the row scales in its state, not on the weight
        scales = weight.SCB if weight.SCB is not None else base.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    raise TypeError(f"not a bitsandbytes quantized linear layer: {type(base).__name__}")


@torch.no_grad()
def requantize(base: nn.Module, value: torch.Tensor) -> None:
    """Replace the base's quantized weight by the quantization of ``value`` [out, in], keeping its
    format (quant type, block size, double quant, storage dtype / int8 row scales)."""
    weight = base.weight
    device = weight.device
    if isinstance(base, bnb.nn.Linear4bit):
        kwargs = {k: v for k, v in weight.__dict__.items()
                  if k in ("blocksize", "compress_statistics", "quant_type", "quant_storage", "module")}
        new = bnb.nn.Params4bit(value.to("cpu", base.compute_dtype or torch.float32), requires_grad=False, **kwargs)
        base.weight = new.to(device)  # quantizes on the move
    else:
        new = bnb.nn.Int8Params(value.to("cpu", torch.float16 if device.type == "cuda" else torch.float32),
                                requires_grad=False, has_fp16_weights=False)
        base.weight = new.to(device)


class LoraQuantizedLinear(LoraLinear):
    """LoRA over ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt``: lora_A [r, in], lora_B
    [out, r] in fp32 (or the compute dtype when that is fp32/fp64), as peft's bnb layers."""

    supports_dora = True  # the norm reads the weight dequantized, once per forward (as peft)

    def __init__(self, base_layer: nn.Module) -> None:
        # not LoraLinear.__init__: it reads the shape from the weight, and a packed 4-bit weight
        # is [n, 1] uint8; the layer knows its real sizes
        AdapterLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (layers/dora.py)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        if isinstance(base_layer, bnb.nn.Linear4bit):
            base_layer.support_avx512bf16_for_cpu = False  # the CPU packing trap (module docstring)
        # add_adapter / forward / delta_weight are LoraLinear's: the packed weight's integer dtype
        # makes the factors fp32 (_adapter_dtype), and the base returns its compute dtype

    @torch.no_grad()
    def merge(self, names=None) -> None:
        names = [n for n in (names if names is not None else self.active_adapters) if n not in self.merged_adapters]
        if not names:
            return
        warnings.warn(f"merging LoRA into a {type(self.base_layer).__name__}: the merged weight is quantized "
                      "again, so it carries a second rounding (as peft's merge does)")
        weight = dequantized_weight(self.base_layer)
        for name in names:
            weight = self._merged(name, weight, self.delta_weight(name))
            self.merged_adapters.append(name)
        requantize(self.base_layer, weight)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        warnings.warn(f"unmerging LoRA from a {type(self.base_layer).__name__}: dequantize, subtract, quantize "
                      "again; the base does not get its original codes back exactly")
        weight = dequantized_weight(self.base_layer)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self._unmerged(name, weight, self.delta_weight(name))
        requantize(self.base_layer, weight)

    def dora_rows(self) -> torch.Tensor:
        """DoRA's norm reads W dequantized (a full-size fp32 temporary, as peft's per forward)."""
        return dequantized_weight(self.base_layer)


def _factory(module: nn.Module, config, shape: tuple) -> nn.Module:
    if config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out=True but the target is a bitsandbytes Linear: using fan_in_fan_out=False")
        config.fan_in_fan_out = False
    return LoraQuantizedLinear(module)


register_lora_layer(bnb.nn.Linear4bit, _factory, linear=True)
register_lora_layer(bnb.nn.Linear8bitLt, _factory, linear=True)
