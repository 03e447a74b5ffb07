"""Trainable tokens: train chosen rows of an embedding (new or existing tokens), nothing else.

peft's layer rebuilds the whole V x d matrix with the trained rows every forward (``index_copy``)
and so also gets a dense V x d gradient. Here the frozen embedding runs unchanged and only the
positions holding a trainable token take their row from a [k, d] leaf (``TokenRows``): memory
beyond the frozen model is O(k x d) plus activations (rule 2 of docs/architecture.md), and the
trainable rows are the only tensor of their module, read only in its forward (rule 1), so an
engine can shard the rows as a unit of their own.

A tied output head (``tie_word_embeddings``) gets ``TiedTokensHead``: the logits of the chosen
tokens come from the same ``TokenRows`` (no second copy), the head's bias kept. Merge writes the
rows into the embedding weight in place, so the tie survives merge and unload.

What is saved is the rows themselves (peft's ``trainable_tokens_delta`` holds the replacement
rows, not a difference), under peft's keys (see ``names.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import AdapterLayer, _adapter_dtype


def _writable(activation: torch.Tensor) -> torch.Tensor:
    """autograd forbids changing some views in place (a sharded engine's output can be one):
    write into a copy of the activation then, never of the V x d weight."""
    return activation.clone() if activation._is_view() else activation


class TokenRows(nn.Module):
    """The k trainable rows of one adapter, with their token ids and the original rows.

    ``forward(x, base_out, mode)``:
      - ``"embed"``: x are token ids, base_out the frozen embedding's output [..., d]; positions
        holding a chosen token take its row (times ``scale`` for scaled embeddings).
      - ``"logits"``: x are hidden states [..., d], base_out the frozen head's logits [..., V];
        the chosen tokens' logits become x . row (+ ``bias``).
    """

    def __init__(self, indices: list[int], rows: torch.Tensor, original: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(rows)
        idx = torch.tensor(indices, dtype=torch.long, device=rows.device)
        order = torch.argsort(idx)
        # O(k) lookup by binary search over the sorted ids; no V-sized table (rule 2).
        self.register_buffer("indices", idx, persistent=False)
        self.register_buffer("sorted_indices", idx[order], persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("original", original, persistent=False)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, mode: str = "embed",
                scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.place(x, base_out, self.weight, mode, scale, bias)

    def place(self, x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor, mode: str,
              scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``forward`` with the rows given as ``weight`` (this module's own, or a local view of it)."""
        if mode == "embed":
            pos = torch.searchsorted(self.sorted_indices, x).clamp_(max=len(self.sorted_indices) - 1)
            hit = self.sorted_indices[pos] == x
            if torch.compiler.is_compiling():
                # static shapes (a boolean index would be a graph break): a row for every
                # position, kept where it holds a chosen token; O(N x d) activation, not V x d
                rows = F.embedding(self.order[pos], weight)
                rows = rows * scale.to(rows.dtype) if scale is not None else rows
                return torch.where(hit.unsqueeze(-1), rows.to(base_out.dtype), base_out)
            rows = F.embedding(self.order[pos[hit]], weight)  # [positions holding a chosen token, d]
            if scale is not None:
                rows = rows * scale.to(rows.dtype)
            # in place: an embedding's backward needs only the ids, never its output
            return _writable(base_out).index_put_((hit,), rows.to(base_out.dtype))
        if mode == "logits":
            extra = F.linear(x.to(weight.dtype), weight, None if bias is None else bias[self.indices].to(weight.dtype))
            # in place: the frozen head's backward does not need its own output
            return _writable(base_out).index_copy_(-1, self.indices, extra.to(base_out.dtype))
        raise ValueError(f"TokenRows mode must be 'embed' or 'logits', got {mode!r}")

    def extra_repr(self) -> str:
        return f"k={self.weight.shape[0]}, dim={self.weight.shape[1]}"


class TrainableTokensLayer(AdapterLayer):
    """Wraps an ``nn.Embedding``; ``trainable_tokens_delta[<adapter>]`` holds its TokenRows."""

    adapter_module_names = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Embedding, shape: Optional[Sequence[int]] = None) -> None:
        """``shape``: the embedding's real [V, d] where an engine holds it partitioned."""
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = tuple(base_layer.weight.shape if shape is None else shape)
        self.trainable_tokens_delta = nn.ModuleDict()

    def token_indices(self, name: str) -> list[int]:
        return self.trainable_tokens_delta[name].indices.tolist()

    def check_indices(self, name: str, indices: list[int], where: str) -> None:
        bad = [i for i in indices if not 0 <= i < self.num_embeddings]
        if bad:
            raise ValueError(f"{where}: token indices {bad[:5]} are out of range for an embedding of "
                             f"{self.num_embeddings} rows")
        for other in self.adapter_names():
            both = sorted(set(indices) & set(self.token_indices(other)))
            if both:
                raise ValueError(f"{where}: adapter {name!r} claims token indices {both[:5]} that adapter "
                                 f"{other!r} already trains; give each adapter its own tokens")

    @torch.no_grad()
    def add_adapter(self, name: str, token_indices: list[int], init_weights: bool = True,
                    original: Optional[torch.Tensor] = None) -> None:
        """``init_weights=True``: the current rows (a no-op until trained); False: N(0, 1) rows.
        ``original``: the embedding's rows of ``token_indices`` [k, d], read by the caller where
        an engine holds the weight partitioned; None: read from ``base_layer.weight``."""
        weight = self.base_layer.weight
        if original is None:
            original = weight[torch.tensor(token_indices, device=weight.device)].detach().clone()
        dtype = _adapter_dtype(weight)
        rows = original.to(dtype) if init_weights else torch.randn(original.shape, dtype=dtype, device=weight.device)
        self.trainable_tokens_delta[name] = TokenRows(token_indices, rows.clone(), original)

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        run = self._adapters_to_run()
        out = self.base_layer(ids, *args, **kwargs)
        scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma...)
        for name in run:
            out = self.trainable_tokens_delta[name](ids, out, "embed", scale=scale)
        return out

    @torch.no_grad()
    def merge(self, names: Optional[list[str]] = None) -> None:
        weight = self.base_layer.weight
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters:
                continue
            rows = self.trainable_tokens_delta[name]
            weight.data.index_copy_(0, rows.indices, rows.weight.data.to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            rows = self.trainable_tokens_delta[self.merged_adapters.pop()]
            weight.data.index_copy_(0, rows.indices, rows.original.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, dim={self.embedding_dim}"


class TiedTokensHead(nn.Module):
    """An output head tied to a TrainableTokensLayer's embedding. Holds no trainable tensor: it
    calls the embedding's TokenRows (kept out of its own module tree, so nothing is registered or
    saved twice). Follows the embedding layer's active / merged / disabled state."""

    adapter_module_names = ()

    def __init__(self, base_layer: nn.Module, tokens: TrainableTokensLayer) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tokens = [tokens]  # a list hides it from named_modules / state_dict
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter_names(self) -> list[str]:
        return []

    def adapter_parameters(self, name: str):
        return iter(())

    def set_adapter(self, names: list[str]) -> None:
        pass

    def merge(self, names: Optional[list[str]] = None) -> None:
        pass  # the weight is the embedding's: merged there

    def unmerge(self) -> None:
        pass

    def unloaded(self, merge: bool) -> nn.Module:
        return self.base_layer

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(hidden, *args, **kwargs)
        tokens = self._tokens[0]
        if tokens.adapters_disabled:
            return out
        bias = getattr(self.base_layer, "bias", None)
        for name in tokens.active_adapters:
            if name not in tokens.merged_adapters:
                out = tokens.trainable_tokens_delta[name](hidden, out, "logits", bias=bias)
        return out
