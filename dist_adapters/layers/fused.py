"""The fused LoRA Linear: base product and LoRA update as one autograd function.

    y  = x W^T + bias + s (d(x) A^T) B^T          (Conv1D: x W + bias + ...)
    dX = dY W + s ((dY B) A) * mask/(1-p)          (one accumulate into dX when p == 0)
    dA = s (dY B)^T d(x),  dB = s dY^T (d(x) A^T)

where d is dropout with keep-mask ``mask`` (identity when p == 0). What the unfused path
(``LoraLinear.forward`` through the ``LoraFactor`` leaves) costs beyond the base, and this saves:

- forward: the LoRA product is accumulated into the base output by ``addmm_`` (no
  out_features-wide temporary, no separate add);
- backward: the LoRA part of dX is accumulated into the base's dX by ``addmm_`` instead of
  autograd summing two N x in_features gradients; dY is read for ``dY B`` and ``dY^T h`` only;
- saved for backward: x (the input itself, not a copy), the rank-r activation ``h = d(x) A^T``
  and, with dropout, the boolean keep-mask (a quarter of an fp32 copy; the dropped input is
  rebuilt from x and the mask in backward).

The base weight must be frozen and held whole (a plain tensor, not partitioned, not quantized);
``LoraLinear._fusable`` checks that, and that nothing hooks or wraps the leaves, before it takes
this path. Factors may be fp32 over a bf16/fp16 base: the LoRA terms are computed in the
factors' dtype and cast once where they meet the base's tensors, as the unfused path does.
"""

from __future__ import annotations

from typing import Optional

import torch


def _matmul_base(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 fan_in_fan_out: bool) -> torch.Tensor:
    w = weight if fan_in_fan_out else weight.T  # [in, out]
    return torch.addmm(bias, x2, w) if bias is not None else x2 @ w


def _accumulate(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """target += left @ right, in one addmm when the dtypes agree."""
    if target.dtype == left.dtype:
        target.addmm_(left, right)
    else:
        target.add_((left @ right).to(target.dtype))


class FusedLoraLinear(torch.autograd.Function):
    """Forward and backward of a frozen Linear/Conv1D plus one LoRA adapter (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, training: bool,
                fan_in_fan_out: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        mask = None
        dropped = x2
        if dropout_p > 0 and training:
            # aten's native_dropout: the same draws as nn.Dropout (CPU and CUDA)
            dropped, mask = torch.ops.aten.native_dropout(x2, dropout_p, True)
        h = dropped.to(lora_a.dtype) @ lora_a.T  # [N, r]
        out = _matmul_base(x2, weight, bias, fan_in_fan_out)
        _accumulate(out, h * scaling, lora_b.T)
        ctx.save_for_backward(x2, mask, h, weight, lora_a, lora_b)
        ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out = scaling, dropout_p, fan_in_fan_out
        ctx.x_shape = shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, mask, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        dy_f = dy.to(lora_b.dtype)
        g = (dy_f @ lora_b) * s  # [N, r]: s dY B
        grad_b = (dy_f.T @ h) * s if ctx.needs_input_grad[4] else None
        if mask is None:
            grad_a = g.T @ x2.to(lora_a.dtype) if ctx.needs_input_grad[3] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = dy @ (weight.T if ctx.fan_in_fan_out else weight)  # [N, in]
                _accumulate(grad_x, g, lora_a)
                grad_x = grad_x.view(ctx.x_shape)
            return grad_x, None, None, grad_a, grad_b, None, None, None, None
        grad_a, grad_x = FusedLoraLinear._dropout_backward(ctx, dy, g, x2, mask, weight, lora_a)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None

    @staticmethod
    def _dropout_backward(ctx, dy, g, x2, mask, weight, lora_a):
        """dA = (1/(1-p)) g^T (x * mask) and dX = dY W + (1/(1-p)) (g A) * mask, with the bool mask
        widened once into a buffer that then holds x * mask: mixed bool / float elementwise ops
        and fresh N x in allocations cost several times a float pass on CPU (docs/field-notes.md)."""
        keep = 1.0 / (1.0 - ctx.dropout_p)
        kept = torch.empty(x2.shape, dtype=lora_a.dtype, device=x2.device).copy_(mask)  # 0/1 in the factors' dtype
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = dy @ (weight.T if ctx.fan_in_fan_out else weight)  # [N, in]
            lora_part = (g @ lora_a).mul_(kept)
            if grad_x.dtype == lora_part.dtype:
                grad_x.add_(lora_part, alpha=keep)
            else:
                grad_x.add_((lora_part * keep).to(grad_x.dtype))
            grad_x = grad_x.view(ctx.x_shape)
        grad_a = None
        if ctx.needs_input_grad[3]:
            grad_a = (g.T @ kept.mul_(x2)) * keep  # kept now holds x * mask
        return grad_a, grad_x

