"""DoRA (peft's ``use_dora=True``): the weight's magnitude and direction trained apart.

    Linear / Conv1D:  y = (m / n) * (base(x) - bias + s * B(A(x))) + bias
    Embedding:        y = (m / n) * (base(ids) + s * B(A[ids]))

``m`` is ``lora_magnitude_vector.<adapter>`` (one value per output row; per embedding dimension
for an embedding), ``n`` the norm of the adapted weight ``W + s B A`` over the same rows, treated
as a constant in backward (as the paper, section 4.3, and peft do). The keys, the initial ``m``
(that norm, with the factors as initialised) and the merge are peft's.

What runs differs from peft, which builds ``B @ A`` (out x in) in every forward. Here

    n^2 = |W|^2 + 2 s rowsum((W A^T) * B) + s^2 rowsum((B (A A^T)) * B)

costs O(out x in x r) with O(out x r) memory: ``W A^T`` is lora_A's own forward on the rows of W
(in row chunks, so a bf16 weight is never copied whole to fp32), ``A A^T`` lora_A's forward with
``gram=True``, B comes out of lora_B's forward on the r x r identity. The factors are read only
inside their own forwards (rule 1 of docs/architecture.md), so an engine that gathers a factor
around its forward gathers it here too. ``|W|^2`` per row is cached per frozen weight, keyed on
the weight's storage and version (an in-place write, a merge, a load or an init changes the
version), and dropped by merge / unmerge / ``reset``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

ROW_CHUNK = 2048  # rows of W turned into fp32 at a time


class Magnitude(nn.Module):
    """lora_magnitude_vector.<adapter>: weight [rows]; ``forward(norm)`` is ``m / norm``."""

    def __init__(self, rows: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, device=device, dtype=dtype))

    def forward(self, norm: torch.Tensor) -> torch.Tensor:
        return self.weight / norm


def _transposed(layer) -> bool:
    """Whether the magnitude runs along the weight's second dim: Conv1D (stored [in, out]) and
    Embedding ([V, d], one magnitude per d)."""
    return bool(getattr(layer, "fan_in_fan_out", False) or hasattr(layer, "num_embeddings"))


def _weight_rows(layer) -> torch.Tensor:
    """The base weight with one row per magnitude entry (a view)."""
    weight = layer.base_layer.weight
    return weight.T if _transposed(layer) else weight


def _squared_rows(layer, rows: torch.Tensor) -> torch.Tensor:
    """|W|^2 per row, fp32, cached for this storage and version of the weight."""
    key = (rows.data_ptr(), rows._version, tuple(rows.shape), rows.device)
    cache = layer.__dict__.setdefault("_dora_squared_rows", {})
    if key not in cache:
        cache.clear()
        cache[key] = torch.cat([chunk.float().pow(2).sum(1) for chunk in rows.split(ROW_CHUNK)])
    return cache[key]


def forget_weight(layer) -> None:
    """Drop the cached |W|^2 (the weight changed)."""
    layer.__dict__.pop("_dora_squared_rows", None)


def weight_rows(layer) -> torch.Tensor:
    """The layer's own rows of W (an engine's subclass may hold them sharded: ``dora_rows``)."""
    own = getattr(layer, "dora_rows", None)
    return own() if own is not None else _weight_rows(layer)


def squared_rows(layer, rows: torch.Tensor) -> torch.Tensor:
    """|W|^2 per row; an engine whose rows are partial (row-parallel) completes the sums."""
    squares = _squared_rows(layer, rows)
    complete = getattr(layer, "dora_complete_squares", None)
    return complete(squares) if complete is not None else squares


def base_bias(layer) -> Optional[torch.Tensor]:
    own = getattr(layer, "dora_bias", None)
    return own() if own is not None else getattr(layer.base_layer, "bias", None)


@torch.no_grad()
def weight_norm(layer, name: str) -> torch.Tensor:
    """|W + s B A| per row (fp32), without building B A."""
    rows = weight_rows(layer)
    lora_a, lora_b = layer.adapter_factors(name)
    s = layer.scaling[name]
    if hasattr(layer, "num_embeddings"):  # rows = W.T [d, V]: W A^T = (A W)^T
        projected = lora_a(None, project=layer.base_layer.weight).T.float()
    else:
        projected = torch.cat([lora_a(chunk).float() for chunk in rows.split(ROW_CHUNK)])  # [out, r]
    gram = lora_a(None, gram=True).float()  # [r, r]
    complete = getattr(layer, "dora_complete_products", None)  # partial over an input split
    if complete is not None:
        projected, gram = complete(projected), complete(gram)
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=lora_b.weight.dtype)
    b = lora_b(eye).T.float()  # [out, r]
    squared = squared_rows(layer, rows) + 2 * s * (projected * b).sum(1) + s * s * ((b @ gram) * b).sum(1)
    return squared.clamp_min(0).sqrt()


def add_magnitude(layer, name: str) -> None:
    """lora_magnitude_vector.<name> = the adapted weight's norm per row, as peft initialises it."""
    norm = weight_norm(layer, name)
    layer.lora_magnitude_vector[name] = Magnitude(norm.shape[0], device=norm.device, dtype=norm.dtype)
    with torch.no_grad():
        layer.lora_magnitude_vector[name].weight.copy_(norm)


def linear_forward(layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (the base output, bias included) with adapter ``name``'s DoRA applied:
    peft's ``result + (m/n - 1) * base + (m/n) * lora``, arranged as ``(m/n) * (base + lora)`` (+
    bias), with ``base + lora`` one addmm (lora_B's ``accumulate``)."""
    dropout = layer.lora_dropout[name]
    scale = layer.lora_magnitude_vector[name](weight_norm(layer, name))  # gradient reaches m only
    lora_a, lora_b = layer.adapter_factors(name)
    bias = base_bias(layer)
    if isinstance(dropout, nn.Identity) or not layer.training:
        base = result if bias is None else result - bias
        adapted = lora_b(lora_a(x) * layer.scaling[name], accumulate=base)
        out = (scale * adapted).to(result.dtype)
        return out if bias is None else out + bias
    # the base once more, on the dropped input, as peft (its own forward: an engine's collectives run)
    dropped = dropout(x)
    base = layer.base_layer(dropped)
    base = base if bias is None else base - bias
    adapted = lora_b(lora_a(dropped) * layer.scaling[name], accumulate=base)
    return result - base + (scale * adapted).to(result.dtype)


def embedding_forward(layer, name: str, ids: torch.Tensor, result: torch.Tensor, **lookup) -> torch.Tensor:
    """(m / n) * (``result`` + s * B(A[ids]))."""
    scale = layer.lora_magnitude_vector[name](weight_norm(layer, name))
    lora_a, lora_b = layer.adapter_factors(name)
    adapted = lora_b(lora_a(ids, **lookup) * layer.scaling[name], accumulate=result)
    return (scale * adapted).to(result.dtype)


def _factor(layer, name: str, norm: torch.Tensor) -> torch.Tensor:
    """m / n shaped to scale the base weight in its own layout."""
    factor = layer.lora_magnitude_vector[name].weight.float() / norm
    return factor.view(1, -1) if _transposed(layer) else factor.view(-1, 1)


@torch.no_grad()
def merged(layer, name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(m / n) * (W + delta) in the weight's layout (fp32); remembers n for ``unmerged``."""
    adapted = weight.float() + delta
    squares = (adapted.T if _transposed(layer) else adapted).pow(2).sum(1)
    complete = getattr(layer, "dora_complete_local_squares", None)  # a merge on local shards
    norm = (complete(squares) if complete is not None else squares).sqrt()
    layer.__dict__.setdefault("_dora_merge_norms", {})[name] = norm
    forget_weight(layer)
    return _factor(layer, name, norm) * adapted


@torch.no_grad()
def unmerged(layer, name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    norm = layer.__dict__["_dora_merge_norms"].pop(name)
    forget_weight(layer)
    return weight.float() / _factor(layer, name, norm) - delta


def dora_names(layer) -> list[str]:
    container: Optional[nn.ModuleDict] = getattr(layer, "lora_magnitude_vector", None)
    return list(container.keys()) if container is not None else []
