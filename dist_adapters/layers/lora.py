"""LoRA for nn.Linear, transformers' Conv1D (fan_in_fan_out) and nn.Embedding.

    y = base(x) + sum over active adapters of  B(A(dropout(x)) * scaling)

Rule 1 of docs/architecture.md: every trainable tensor lives in its own leaf module
(``LoraFactor``, ``EmbeddingFactor``) and is read only inside that module's ``forward``. The
parent layers call the leaves; they never touch ``lora_A.weight`` in forward, so an engine can
shard or gather a leaf around the leaf's own forward, and swap in a subclass of a leaf that
computes with its sharded weight (``parallel/tensor.py``). Merge reads the weights directly, but
only inside the engine's gather context (rule 3: ``parallel/access.py``, entered by
``merge.py``).

The layers know no engine: where an engine holds the base weight partitioned, the caller passes
its real shape (``shape``; ``inject.py`` asks the engine access for it).

Module and parameter names follow peft's in-memory layout (``base_layer``, ``lora_A.<adapter>``,
``lora_embedding_A.<adapter>``) so the mapping to peft's checkpoint keys stays a one-liner per
kind (``names.py``).

The scaling is applied to the rank-r activation before ``lora_B`` rather than to the full
output: the same product, but an elementwise op over r columns instead of out_features.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .fused import FusedLoraLinear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Adapters train in fp32 over bf16/fp16/quantized bases (as peft's autocast_adapter_dtype).
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class LoraFactor(nn.Linear):
    """One LoRA factor (A: in -> r, or B: r -> out). Casts its input to its own dtype.

    ``accumulate``: a tensor to add the product to (the base layer's output). With matching dtypes
    the sum is one ``addmm`` instead of a product plus a separate out_features-wide add, which
    saves a full pass over the output in forward; autograd passes the gradient of ``accumulate``
    straight through.
    """

    def forward(self, x: Optional[torch.Tensor], accumulate: Optional[torch.Tensor] = None,
                gram: bool = False) -> torch.Tensor:
        if gram:  # weight @ weight.T (DoRA's norm, layers/dora.py)
            return self.weight @ self.weight.T
        x = x.to(self.weight.dtype)
        if accumulate is None:
            return F.linear(x, self.weight)
        if accumulate.dtype != self.weight.dtype or type(accumulate) is not torch.Tensor:
            return accumulate + F.linear(x, self.weight).to(accumulate.dtype)
        out = torch.addmm(accumulate.reshape(-1, accumulate.shape[-1]), x.reshape(-1, x.shape[-1]), self.weight.T)
        return out.view(accumulate.shape)


class EmbeddingFactor(nn.Module):
    """lora_embedding_A: weight [r, num_embeddings] (peft's layout); looks up columns by token id."""

    def __init__(self, r: int, num_embeddings: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(r, num_embeddings, device=device, dtype=dtype))

    def forward(self, ids: Optional[torch.Tensor], *args, gram: bool = False,
                project: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if gram:  # weight @ weight.T, and weight @ project (DoRA's norm, layers/dora.py)
            return self.weight @ self.weight.T
        if project is not None:
            return self.weight @ project.to(self.weight.dtype)
        return self.lookup(ids, self.weight, *args, **kwargs)

    @staticmethod
    def lookup(ids: torch.Tensor, weight: torch.Tensor, padding_idx=None, max_norm=None, norm_type=2.0,
               scale_grad_by_freq=False, sparse=False) -> torch.Tensor:
        return F.embedding(ids, weight.T, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)


class AdapterLayer(nn.Module):
    """Bookkeeping shared by adapter layers: which adapters exist, are active, are merged."""

    adapter_module_names: tuple[str, ...] = ()
    supports_dora = False  # layers/dora.py runs on it (enable_dora)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects ``module.weight`` (as peft's layers offer)."""
        return self.base_layer.weight

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_module_names[0]).keys())

    def adapter_parameters(self, name: str) -> Iterable[nn.Parameter]:
        for attr in self.adapter_module_names:
            container = getattr(self, attr)
            if name in container:
                yield from container[name].parameters()

    def set_adapter(self, names: list[str]) -> None:
        """Activate ``names`` (existing ones): their parameters train, the others are frozen."""
        for name in self.adapter_names():
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in names)
        self.active_adapters = [n for n in names if n in self.adapter_names()]

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, names: Optional[list[str]] = None) -> None:
        """Add the deltas of ``names`` (default: the active adapters) into the base weight."""
        weight = self.base_layer.weight
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters:
                continue
            delta = self.delta_weight(name)
            weight.data.copy_(self._merged(name, weight.data, delta).to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.delta_weight(name)
            weight.data.copy_(self._unmerged(name, weight.data, delta).to(weight.dtype))

    def _merged(self, name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if name in dora.dora_names(self):
            return dora.merged(self, name, weight, delta)
        return weight.to(delta.dtype) + delta

    def _unmerged(self, name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if name in dora.dora_names(self):
            return dora.unmerged(self, name, weight, delta)
        return weight.to(delta.dtype) - delta

    def enable_dora(self, name: str) -> None:
        """Make adapter ``name`` a DoRA adapter (peft's use_dora), magnitude initialised as peft."""
        if not self.supports_dora:
            raise NotImplementedError(f"use_dora=True on a {type(self).__name__} (over "
                                      f"{type(self.base_layer).__name__}) is not supported; DoRA runs on "
                                      "nn.Linear, transformers Conv1D and nn.Embedding")
        dora.add_magnitude(self, name)

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module that replaces this layer on unload."""
        if merge:
            self.merge()
        elif self.merged_adapters:
            self.unmerge()
        return self.base_layer

    def _adapters_to_run(self) -> list[str]:
        if self.adapters_disabled:
            if self.merged_adapters:
                self.unmerge()
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]


class LoraLinear(AdapterLayer):
    """LoRA over ``nn.Linear`` (weight [out, in]) or transformers ``Conv1D`` (weight [in, out],
    ``fan_in_fan_out=True``). lora_A: [r, in], lora_B: [out, r] in both cases, as peft.
    ``shape``: the base weight's real shape where an engine holds it partitioned (default: as
    ``base_layer.weight`` has it)."""

    adapter_module_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_dora = True
    # The fused path (layers/fused.py) where it is safe (_fusable); engines that act around the
    # leaves' own forward turn it off (set_fused, through their strategy row).
    fused = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False,
                 shape: Optional[Sequence[int]] = None) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        shape = tuple(base_layer.weight.shape if shape is None else shape)
        self.in_features, self.out_features = shape if fan_in_fan_out else shape[::-1]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (layers/dora.py)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    def adapter_factors(self, name: str) -> tuple[nn.Module, nn.Module]:
        return self.lora_A[name], self.lora_B[name]

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights=True) -> None:
        weight = self.base_layer.weight
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        self.lora_A[name] = LoraFactor(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = LoraFactor(r, self.out_features, bias=False, **kw)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)
        self.reset_adapter(name, init_lora_weights)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights) -> None:
        """True: kaiming-uniform A, zero B (a no-op); "gaussian": N(0, 1/r) A, zero B;
        False: nn.Linear's random init for both (not a no-op, for tests)."""
        if init_lora_weights is False:
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def _fusable(self, run: list[str], x: torch.Tensor, args, kwargs) -> bool:
        """The fused path reads the factors' and the base's weights outside their modules'
        forward (the exception to rule 1 of docs/architecture.md), so it runs only where nothing
        can depend on those forwards: one plain LoRA adapter; leaves of exactly ``LoraFactor``
        (not wrapped, not swapped for a subclass) without hooks (an engine acting around a
        leaf's forward); a base of exactly nn.Linear / Conv1D without hooks whose weights are
        frozen plain tensors of their full shape (not a tensor subclass, not partitioned); no
        autocast. Engines can also turn it off outright (``set_fused``)."""
        if not self.fused or len(run) != 1 or args or kwargs or run[0] in self.lora_magnitude_vector:
            return False
        base, a, b = self.base_layer, self.lora_A[run[0]], self.lora_B[run[0]]
        if type(a) is not LoraFactor or type(b) is not LoraFactor or not _fusable_base(base, self.fan_in_fan_out):
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in (base, a, b)) or hasattr(base, "_hf_hook"):
            return False
        if torch.is_autocast_enabled(x.device.type) or type(x) is not torch.Tensor:
            return False
        weight = base.weight
        if type(a.weight) is not nn.Parameter or type(b.weight) is not nn.Parameter:
            return False
        return (weight.shape == ((self.in_features, self.out_features) if self.fan_in_fan_out
                                 else (self.out_features, self.in_features))
                and a.weight.shape == (self.r[run[0]], self.in_features)
                and b.weight.shape == (self.out_features, self.r[run[0]]))

    def _fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return FusedLoraLinear.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                                     self.lora_B[name].weight, self.scaling[name], p, dropout.training,
                                     self.fan_in_fan_out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        run = self._adapters_to_run()  # first: it may unmerge before the base runs
        if self._fusable(run, x, args, kwargs):
            return self._fused_forward(run[0], x)
        result = self.base_layer(x, *args, **kwargs)
        for name in run:
            if name in self.lora_magnitude_vector:
                result = dora.linear_forward(self, name, x, result)
                continue
            h = self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name]
            result = self.lora_B[name](h, accumulate=result)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        """B @ A * scaling, in the base weight's layout ([out, in], or [in, out] for Conv1D), fp32."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, fan_in_fan_out={self.fan_in_fan_out}"


def _fusable_base(base: nn.Module, fan_in_fan_out: bool) -> bool:
    kind = type(base)
    if fan_in_fan_out:
        if kind.__name__ != "Conv1D" or not kind.__module__.startswith("transformers."):
            return False
    elif kind is not nn.Linear:
        return False
    tensors = [base.weight] + ([base.bias] if base.bias is not None else [])
    return all(type(t) in (torch.Tensor, nn.Parameter) and not t.requires_grad for t in tensors)


def set_fused(model: nn.Module, enabled: bool) -> None:
    """Turn the fused LoRA Linear path (layers/fused.py) on or off for every LoRA Linear layer."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.fused = enabled


class LoraEmbedding(AdapterLayer):
    """LoRA over ``nn.Embedding``: lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]."""

    adapter_module_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    supports_dora = True

    def __init__(self, base_layer: nn.Embedding, shape: Optional[Sequence[int]] = None) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = tuple(base_layer.weight.shape if shape is None else shape)
        self.lora_embedding_A = nn.ModuleDict()
        self.lora_embedding_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (layers/dora.py)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    def adapter_factors(self, name: str) -> tuple[nn.Module, nn.Module]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights=True) -> None:
        # peft applies no dropout to embedding LoRA; lora_dropout is accepted and ignored likewise.
        weight = self.base_layer.weight
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        self.lora_embedding_A[name] = EmbeddingFactor(r, self.num_embeddings, **kw)
        self.lora_embedding_B[name] = LoraFactor(r, self.embedding_dim, bias=False, **kw)
        self.r[name] = r
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)
        self.reset_adapter(name, init_lora_weights)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights) -> None:
        """True / "gaussian": zero A, N(0, 1) B (a no-op); False: N(0, 1) for both, A first (peft's
        order of draws, so one seed gives peft's factors)."""
        if init_lora_weights is False:
            nn.init.normal_(self.lora_embedding_A[name].weight)
            nn.init.normal_(self.lora_embedding_B[name].weight)
        else:
            nn.init.normal_(self.lora_embedding_B[name].weight)
            nn.init.zeros_(self.lora_embedding_A[name].weight)

    def _embedding_kwargs(self) -> dict:
        base = self.base_layer
        return {"padding_idx": base.padding_idx, "max_norm": base.max_norm, "norm_type": base.norm_type,
                "scale_grad_by_freq": base.scale_grad_by_freq, "sparse": base.sparse}

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        run = self._adapters_to_run()
        result = self.base_layer(ids, *args, **kwargs)
        for name in run:
            if name in self.lora_magnitude_vector:
                result = dora.embedding_forward(self, name, ids, result, **self._embedding_kwargs())
                continue
            h = self.lora_embedding_A[name](ids, **self._embedding_kwargs()) * self.scaling[name]
            result = self.lora_embedding_B[name](h, accumulate=result)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        """(B @ A).T * scaling: [num_embeddings, dim], fp32."""
        a = self.lora_embedding_A[name].weight.float()
        b = self.lora_embedding_B[name].weight.float()
        return (b @ a).T * self.scaling[name]

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, dim={self.embedding_dim}, r={self.r}"
