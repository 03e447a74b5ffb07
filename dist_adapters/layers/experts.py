"""LoRA on parameters rather than modules (peft's ``target_parameters``): the 3-D expert weights
of mixture-of-experts layers, and 2-D weights held by modules that are not ``nn.Linear``
(transformers' routers, ``mlp.gate.weight``).

peft's layout (its ``ParamWrapper``), which the files keep:
- one wrapper per targeted parameter; several parameters of one module nest, the first one
  registered in the module innermost, so its keys carry one ``base_layer.`` more per later one;
- an expert weight stacked ``[E, out, in]`` (``[E, in, out]`` when the experts module has
  ``is_transposed``) gets lora_A ``[E*r, in]``, expert-major (A_e = rows e*r .. e*r+r-1), and
  lora_B ``[out, r*E]``, rank-major (B_e = columns e, e+E, e+2E, ...);
- a 2-D weight ``[out, in]`` gets an ordinary lora_A ``[r, in]`` / lora_B ``[out, r]``.

What runs differs from peft. peft builds ``W + s B A`` (E x out x in) twice per forward; here an
expert's LoRA is computed on the tokens routed to it, ``s * B_e (A_e x)``, inside a grouped
experts forward (``experts_forward``) that reads the experts module's flags (is_transposed,
has_bias, has_gate, ``_apply_gate``, ``act_fn``) as transformers' experts interface defines them
(``transformers.integrations.moe``), so every family built on it works. Nothing of the size of
the expert weights is built in forward or backward. The factors are leaves read only in their
own forward (rule 1 of docs/architecture.md): ``ExpertFactorA`` / ``ExpertFactorB`` take the
routed tokens sorted by expert and the count per expert; ``WeightFactor`` returns a copy of its
weight for 2-D parameters (a weight, not an activation, is what a router's forward consumes).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .lora import AdapterLayer, _adapter_dtype, lora_scaling


class ExpertFactorA(nn.Module):
    """lora_A of E experts, weight [E*r, in]; maps tokens sorted by expert to their rank-r codes."""

    def __init__(self, num_experts: int, r: int, in_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts, self.r = num_experts, r
        self.weight = nn.Parameter(torch.empty(num_experts * r, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        parts = [F.linear(seg, self.weight[e * self.r:(e + 1) * self.r]) for e, seg in enumerate(x.split(counts))]
        return torch.cat(parts) if parts else x.new_zeros(0, self.r)


class ExpertFactorB(nn.Module):
    """lora_B of E experts, weight [out, r*E]; expert e's columns are e, e+E, ... (peft's order),
    i.e. column j*E + e is [:, j, e] of the view [out, r, E]."""

    def __init__(self, num_experts: int, r: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts, self.r = num_experts, r
        self.weight = nn.Parameter(torch.empty(out_features, r * num_experts, device=device, dtype=dtype))

    def forward(self, h: torch.Tensor, counts: list[int]) -> torch.Tensor:
        h = h.to(self.weight.dtype)
        # [out, r, E'] view: expert e is [:, :, e]; the weight may also be held as that view
        # (with the experts it covers), as expert parallel does (docs/architecture.md)
        by_expert = self.weight.reshape(self.weight.shape[0], self.r, -1)
        parts = [F.linear(seg, by_expert[:, :, e]) for e, seg in enumerate(h.split(counts))]
        return torch.cat(parts) if parts else h.new_zeros(0, self.weight.shape[0])


class WeightFactor(nn.Linear):
    """A LoRA factor of a 2-D parameter; ``forward()`` returns a copy of its weight (a copy: an
    engine may release the gathered weight when the forward returns)."""

    def forward(self) -> torch.Tensor:  # type: ignore[override]
        return self.weight * 1


class LoraParameter(AdapterLayer):
    """LoRA on ``parameter_name`` of the module below (the module itself, or another
    ``LoraParameter`` of the same module). The outermost wrapper runs the module."""

    adapter_module_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str, shape: Optional[tuple] = None) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        module = self.target_module
        shape = tuple(getattr(module, parameter_name).shape if shape is None else shape)
        if len(shape) == 3:
            # [E, out, in], or [E, in, out] when the experts module stores it transposed
            self.num_experts = shape[0]
            self.in_features, self.out_features = (shape[1], shape[2]) if self.is_transposed else (shape[2], shape[1])
        elif len(shape) == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, shape
        else:
            raise ValueError(f"target parameter {parameter_name!r} has shape {list(shape)}; LoRA needs a 2-D "
                             "[out, in] or 3-D [experts, out, in] weight")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    @property
    def target_module(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    @property
    def is_transposed(self) -> bool:
        return bool(getattr(self.target_module, "is_transposed", False))

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.target_module, self.parameter_name)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights=True) -> None:
        if lora_dropout:
            raise ValueError(f"lora_dropout={lora_dropout} on the parameter {self.parameter_name!r}: dropout on a "
                             "parameter target cannot be applied to its input (peft refuses it too); use 0")
        kw = {"device": self.weight.device, "dtype": _adapter_dtype(self.weight)}
        if self.num_experts > 1 or self.weight.dim() == 3:
            self.lora_A[name] = ExpertFactorA(self.num_experts, r, self.in_features, **kw)
            self.lora_B[name] = ExpertFactorB(self.num_experts, r, self.out_features, **kw)
        else:
            self.lora_A[name] = WeightFactor(self.in_features, r, bias=False, **kw)
            self.lora_B[name] = WeightFactor(r, self.out_features, bias=False, **kw)
        self.r[name] = r
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)
        self.reset_adapter(name, init_lora_weights)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights) -> None:
        """As peft: kaiming-uniform over the whole A (fan_in = in), zero B; "gaussian": N(0, 1/r)."""
        if init_lora_weights is False:
            for factor in (self.lora_A[name], self.lora_B[name]):
                nn.init.kaiming_uniform_(factor.weight, a=math.sqrt(5))
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    # ------------------------------------------------------------------ merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B_e A_e per expert, in the parameter's own layout, fp32."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        if isinstance(self.lora_A[name], WeightFactor):
            return (b @ a) * self.scaling[name]
        e, r = self.num_experts, self.r[name]
        a3, b3 = a.reshape(e, r, self.in_features), b.reshape(self.out_features, r, e)
        pattern = "ore,eri->eio" if self.is_transposed else "ore,eri->eoi"
        return torch.einsum(pattern, b3, a3) * self.scaling[name]

    @torch.no_grad()
    def merge(self, names: Optional[list[str]] = None) -> None:
        weight = self.weight
        for name in names if names is not None else self.active_adapters:
            if name not in self.merged_adapters:
                weight.data.copy_((weight.data.float() + self.delta_weight(name)).to(weight.dtype))
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.weight
        while self.merged_adapters:
            weight.data.copy_((weight.data.float() - self.delta_weight(self.merged_adapters.pop())).to(weight.dtype))

    def unloaded(self, merge: bool) -> nn.Module:
        """The experts (or router) module itself: every wrapper of the chain merged or unmerged."""
        for layer in self.chain():
            if merge:
                layer.merge()
            elif layer.merged_adapters:
                layer.unmerge()
        return self.target_module

    # ------------------------------------------------------------------ forward
    def chain(self) -> list["LoraParameter"]:
        """This wrapper and the ones below it, outermost first."""
        found, module = [], self
        while isinstance(module, LoraParameter):
            found.append(module)
            module = module.base_layer
        return found

    def forward(self, *args, **kwargs):
        layers = {layer.parameter_name: layer for layer in self.chain()}
        runs = {p: layer._adapters_to_run() for p, layer in layers.items()}
        module = self.target_module
        if not any(runs.values()):
            return module(*args, **kwargs)
        if any(layer.weight.dim() == 3 for layer in layers.values()):
            return experts_forward(module, *args, lora={p: (layers[p], runs[p]) for p in layers}, **kwargs)
        weights = {p: _with_delta(layers[p], runs[p]) for p in layers}
        return torch.func.functional_call(module, weights, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return (f"parameter={self.parameter_name}, experts={self.num_experts}, in={self.in_features}, "
                f"out={self.out_features}, r={self.r}")


def _with_delta(layer: LoraParameter, names: list[str]) -> torch.Tensor:
    """W + sum of s * B A for a 2-D parameter, through the factors' own forwards."""
    weight = layer.weight
    for name in names:
        delta = layer.lora_B[name]() @ layer.lora_A[name]() * layer.scaling[name]
        weight = weight + delta.to(weight.dtype)
    return weight


def _project(experts: nn.Module, name: str, x: torch.Tensor, counts: list[int], expert_ids: list[int],
             lora: dict) -> torch.Tensor:
    """x (tokens sorted by expert) through each expert's ``name`` weight (+ bias), plus its LoRA."""
    weight = getattr(experts, name)
    bias = getattr(experts, name + "_bias", None) if getattr(experts, "has_bias", False) else None
    parts = []
    for e, seg in zip(expert_ids, x.split(counts)):
        out = seg @ weight[e] if experts.is_transposed else F.linear(seg, weight[e])
        parts.append(out + bias[e] if bias is not None else out)
    result = torch.cat(parts)
    layer, names = lora.get(name, (None, ()))
    for adapter in names:
        h = layer.lora_A[adapter](x, counts) * layer.scaling[adapter]
        result = result + layer.lora_B[adapter](h, counts).to(result.dtype)
    return result


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, lora: dict) -> torch.Tensor:
    """transformers' experts contract ([T, H], [T, K] expert ids, [T, K] weights -> [T, H]) with
    LoRA on the targeted expert weights, computed per expert on the tokens routed to it."""
    num_k, num_tokens = top_k_index.shape[-1], hidden_states.shape[0]
    expert_of = top_k_index.reshape(-1)
    order = torch.argsort(expert_of, stable=True)
    token_of = order // num_k
    counts = torch.bincount(expert_of, minlength=experts.num_experts).tolist()
    ids = list(range(experts.num_experts))
    x = hidden_states[token_of]
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    h = _project(experts, up, x, counts, ids, lora)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _project(experts, "down_proj", h, counts, ids, lora)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    final = torch.zeros(num_tokens, out.shape[-1], dtype=out.dtype, device=out.device)
    return final.index_add_(0, token_of, out).to(hidden_states.dtype)
