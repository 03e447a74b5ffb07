"""LoRA over Megatron-core tensor-parallel linear layers (``ColumnParallelLinear``,
``RowParallelLinear``). Imported by ``layers/optional.py`` when a model holds ``megatron.*``
modules; the engine part (reading, writing, saving the sharded factors whole) is
``parallel/megatron.py``.

Shapes (tp = tensor-parallel size; "full" = the same tensor on every TP rank):

    column base  W [out/tp, in]    lora_A [r, in] full       lora_B [out/tp, r] sharded, dim 0
    row base     W [out, in/tp]    lora_A [r, in/tp] sharded lora_B [out, r] full
                                   dim 1

so that the LoRA delta ``B @ A`` of each rank has exactly the shape of its local base weight and
merge / unmerge are local (no gather). DoRA (``layers/dora.py``): the magnitude is [out/tp]
sharded like lora_B over a column base, [out] full over a row base; its norm reads the local
rows, and over a row base the partial sums (|W|^2, W A^T, A A^T; and |W + s B A|^2 in merge) are
all-reduced over the TP group, forward only (the norm is a constant in backward). Checkpoints hold the full factors: the engine part
(``parallel/megatron.py``) all-gathers / slices the sharded one over the TP group named by its
``da_tp_group`` attribute; it also carries Megatron's own ``tensor_model_parallel`` /
``partition_dim`` attributes, so Megatron's grad-norm and checkpoint helpers treat it as sharded.

Initialisation: every rank draws the FULL factors from its default generator, in the same order
as ``LoraLinear`` over an ``nn.Linear`` of the full shape, then the TP group's first rank
broadcasts them and each rank keeps its slice. Hence the same seed gives the same full adapter at
any TP size, and replicated factors agree across TP ranks even if ranks were seeded differently.

Megatron 0.16's all-gathering mappings allocate on ``torch.cuda.current_device()`` and fail on
CPU; on CPU tensors ``_gather`` / ``_scatter`` below run the same autograd pair with the buffer on
the tensor's device. Everything else uses ``megatron.core.tensor_parallel.mappings`` directly.
Sequence parallel, expert layers and ``disable_grad_reduce`` change which gradients are partial:
they raise ``NotImplementedError`` rather than train silently wrong.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, mappings
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from . import dora
from .lora import AdapterLayer, LoraFactor, _adapter_dtype, lora_scaling
from .registry import register_lora_layer, register_refusal


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _slice_last(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(_group_size(group), dim=-1)[_group_rank(group)].contiguous()


class _GatherLastDim(torch.autograd.Function):
    """Forward: all-gather along the last dim. Backward: keep this rank's slice (no collective;
    the incoming gradient is identical on all TP ranks). = gather_from_tensor_model_parallel_region."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _slice_last(grad, ctx.group), None


class _ScatterLastDim(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim (no collective). Backward: all-gather the
    slices' gradients. = scatter_to_tensor_model_parallel_region."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad, ctx.group), None


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    if x.is_cuda:
        return mappings.gather_from_tensor_model_parallel_region(x, group=group)
    return x if _group_size(group) == 1 else _GatherLastDim.apply(x, group)


def _scatter(x: torch.Tensor, group) -> torch.Tensor:
    if x.is_cuda:
        return mappings.scatter_to_tensor_model_parallel_region(x, group=group)
    return x if _group_size(group) == 1 else _ScatterLastDim.apply(x, group)


def _check_supported(base: nn.Module) -> None:
    kind = type(base).__name__
    if getattr(base, "weight", None) is None:
        raise NotImplementedError(f"LoRA over a {kind} without its own weight (skip_weight_param_allocation=True, "
                                  "e.g. an output layer tied to the embedding) is not supported; exclude it "
                                  "(LoraConfig(exclude_modules=[...]))")
    if getattr(base, "sequence_parallel", False):
        raise NotImplementedError(f"LoRA over a {kind} with sequence_parallel=True is not implemented "
                                  "(the replicated LoRA factor's gradient would be partial per rank); "
                                  "set ModelParallelConfig(sequence_parallel=False)")
    if getattr(base, "explicit_expert_comm", False):
        raise NotImplementedError(f"LoRA over an expert {kind} (is_expert=True) is not implemented: "
                                  f"{_MOE_HINT}")
    if getattr(base, "disable_grad_reduce", False):
        raise NotImplementedError(f"LoRA over a {kind} with disable_grad_reduce=True is not implemented")


class _MegatronLora(AdapterLayer):
    """Shared by both kinds: full-shape init, slicing, merge math. ``sharded`` names the factor
    split over TP ranks and ``dim`` its partition dim."""

    adapter_module_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_dora = True
    sharded: str = ""
    dim: int = 0

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        _check_supported(base_layer)
        group = getattr(base_layer, "tp_group", None)  # Megatron >= 0.13 keeps the layer's own group
        self.tp_group = group if group is not None else parallel_state.get_tensor_model_parallel_group()
        self.tp_size, self.tp_rank = _group_size(self.tp_group), _group_rank(self.tp_group)
        self.in_features, self.out_features = base_layer.input_size, base_layer.output_size  # full sizes
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (layers/dora.py)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    def adapter_factors(self, name: str) -> tuple[nn.Module, nn.Module]:
        return self.lora_A[name], self.lora_B[name]

    def enable_dora(self, name: str) -> None:
        """DoRA on the local shard: the magnitude covers this rank's output rows (column-parallel,
        sharded like lora_B) or all of them (row-parallel, replicated)."""
        if not isinstance(self.lora_dropout[name], nn.Identity):
            raise NotImplementedError(f"use_dora=True with lora_dropout over a {type(self.base_layer).__name__} is "
                                      "not implemented (the base would run twice per forward); use lora_dropout=0")
        dora.add_magnitude(self, name)
        if self.sharded == "lora_B":
            magnitude = self.lora_magnitude_vector[name].weight
            set_tensor_model_parallel_attributes(magnitude, is_parallel=True, dim=0, stride=1)
            magnitude.da_tp_group = self.tp_group

    def _row_split(self) -> bool:
        """Whether each rank holds a slice of every output row (row-parallel over > 1 rank)."""
        return self.sharded == "lora_A" and self.tp_size > 1

    def _all_reduced(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group: all-reduce, forward only (DoRA's norm is a constant)."""
        if not self._row_split():
            return partial
        total = partial.clone()
        dist.all_reduce(total, group=self.tp_group)
        return total

    dora_complete_squares = dora_complete_products = dora_complete_local_squares = _all_reduced

    def _dora(self, name: str, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``out`` (this rank's base output) with DoRA for adapter ``name``, given h = A(x) * s
        complete on every rank: (m / n) * (out - bias + B h) + bias, with the bias the base added."""
        bias = self.base_layer.bias if getattr(self.base_layer, "bias", None) is not None and not getattr(
            self.base_layer, "skip_bias_add", False) else None
        scale = self.lora_magnitude_vector[name](dora.weight_norm(self, name))
        adapted = self.lora_B[name](h, accumulate=out if bias is None else out - bias)
        result = (scale * adapted).to(out.dtype)
        return result if bias is None else result + bias

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights=True) -> None:
        weight = self.base_layer.weight
        kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        shapes = {"lora_A": [r, self.in_features], "lora_B": [self.out_features, r]}
        shapes[self.sharded][self.dim] //= self.tp_size
        # skip_init: no RNG draws here, so the full-shape draws in reset_adapter are the only ones
        self.lora_A[name] = nn.utils.skip_init(LoraFactor, shapes["lora_A"][1], r, bias=False, **kw)
        self.lora_B[name] = nn.utils.skip_init(LoraFactor, r, shapes["lora_B"][0], bias=False, **kw)
        p = getattr(self, self.sharded)[name].weight
        set_tensor_model_parallel_attributes(p, is_parallel=True, dim=self.dim, stride=1)
        p.da_tp_group = self.tp_group  # parallel/megatron.py and save_megatron_shards gather over it
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)
        self.reset_adapter(name, init_lora_weights)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights) -> None:
        """Collective over the TP group. Same values as ``LoraLinear.reset_adapter`` after
        ``LoraLinear.add_adapter`` over an nn.Linear of the full shape, from the same RNG state."""
        like = self.lora_A[name].weight
        a = torch.empty(self.r[name], self.in_features, device=like.device, dtype=like.dtype)
        b = torch.empty(self.out_features, self.r[name], device=like.device, dtype=like.dtype)
        for t in (a, b):  # nn.Linear's own init, as LoraFactor's constructor draws it in LoraLinear
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        if init_lora_weights is not False:
            if init_lora_weights == "gaussian":
                nn.init.normal_(a, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        if self.tp_size > 1:  # one full init for the whole TP group: its first rank's
            src = dist.get_process_group_ranks(self.tp_group)[0]
            for t in (a, b):
                dist.broadcast(t, src=src, group=self.tp_group)
        full = {"lora_A": a, "lora_B": b}
        for kind, value in full.items():
            if kind == self.sharded:
                value = value.chunk(self.tp_size, dim=self.dim)[self.tp_rank]
            getattr(self, kind)[name].weight.copy_(value)

    def delta_weight(self, name: str) -> torch.Tensor:
        """Local B @ A * scaling, fp32, shaped as the local base weight: no gather needed."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, tp={self.tp_size}, "
                f"sharded={self.sharded}[dim {self.dim}]")


class LoraColumnParallelLinear(_MegatronLora):
    """LoRA over ``ColumnParallelLinear``: lora_A [r, in] replicated, lora_B [out/tp, r] sharded.

    Collectives per adapter (forward / backward):
    - ``copy_to_tensor_model_parallel_region(h)``: identity / all-reduce. h = A(x) * s is the same
      on every rank, but each rank's dh = dy_local @ B_local only covers its output slice; the
      all-reduce makes dh complete before A's gradient and the input gradient are formed.
    - ``gather_output``: the base runs with ``runtime_gather_output=False``, the LoRA output is
      added to its local slice, and the sum is gathered once (all-gather / split, i.e.
      ``gather_from_tensor_model_parallel_region``): one collective for both paths.
    The base's own input handling (all-reduce of its dgrad) is unchanged. Returns Megatron's
    ``(output, output_bias)`` with output_bias as the base gives it (``skip_bias_add``).
    """

    sharded, dim = "lora_B", 0

    def forward(self, x: torch.Tensor, weight=None, runtime_gather_output=None):
        gather = self.base_layer.gather_output if runtime_gather_output is None else runtime_gather_output
        run = self._adapters_to_run()  # first: it may unmerge before the base runs
        out, bias = self.base_layer(x, weight=weight, runtime_gather_output=False)
        for name in run:
            h = self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name]
            h = mappings.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            out = self._dora(name, out, h) if name in self.lora_magnitude_vector else self.lora_B[name](h, accumulate=out)
        return (_gather(out, self.tp_group) if gather else out), bias


class LoraRowParallelLinear(_MegatronLora):
    """LoRA over ``RowParallelLinear``: lora_A [r, in/tp] sharded, lora_B [out, r] replicated.

    Collectives per adapter (forward / backward):
    - ``reduce_from_tensor_model_parallel_region(h)``: all-reduce / identity. Each rank's
      A_local(x_local) * s is a partial sum over its input slice; after the all-reduce h is
      complete and the same everywhere, so B and its gradient are local; dh (identical on all
      ranks) flows to each rank's A slice unchanged.
    - ``input_is_parallel=False``: the layer takes over the base's input scatter (split /
      all-gather, i.e. ``scatter_to_tensor_model_parallel_region``) so the base and LoRA read the
      same local slice and the input gradient is all-gathered once; the base is switched to
      ``input_is_parallel=True`` while wrapped and restored on unload.
    Returns Megatron's ``(output, output_bias)`` with output_bias as the base gives it.
    Dropout draws from the default generator (same state on all TP ranks), so the masks of the
    ranks' input slices are correlated; use lora_dropout=0 where that matters.
    """

    sharded, dim = "lora_A", 1

    def __init__(self, base_layer: RowParallelLinear) -> None:
        super().__init__(base_layer)
        self.input_is_parallel = base_layer.input_is_parallel
        base_layer.input_is_parallel = True

    def forward(self, x: torch.Tensor):
        run = self._adapters_to_run()
        x = x if self.input_is_parallel else _scatter(x, self.tp_group)
        out, bias = self.base_layer(x)
        for name in run:
            h = self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name]
            h = mappings.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
            out = self._dora(name, out, h) if name in self.lora_magnitude_vector else self.lora_B[name](h, accumulate=out)
        return out, bias

    def unloaded(self, merge: bool) -> nn.Module:
        base = super().unloaded(merge)
        base.input_is_parallel = self.input_is_parallel
        return base


def _factory(cls):
    def make(module: nn.Module, config, shape: tuple) -> nn.Module:
        # config.megatron_config (peft's way to rebuild the parallel layers) is not needed: the
        # parallel layout comes from the base layer itself.
        if config.bias != "none":
            raise NotImplementedError(f"LoraConfig(bias={config.bias!r}) over Megatron-core layers is not "
                                      "implemented (the column-parallel bias is sharded); use bias='none'")
        config.fan_in_fan_out = False  # Megatron weights are [out, in], as nn.Linear's
        return cls(module)
    return make


_MOE_HINT = ("Megatron-core MoE experts get no LoRA here (exclude them with LoraConfig(exclude_modules=[...])); "
             "LoRA on experts runs on transformers' MoE models (LoraConfig.target_parameters)")


def _grouped_experts(module: nn.Module) -> Optional[str]:
    """Megatron-core's grouped experts hold their weights as parameters (weight1 / weight2), not
    as Linear layers: "all-linear" would pass over them without a word."""
    cls = type(module)
    if cls.__module__.startswith("megatron.core.transformer.moe") and cls.__name__ in ("GroupedMLP", "TEGroupedMLP"):
        return f"LoRA over Megatron-core grouped experts ({cls.__name__}) is not implemented: {_MOE_HINT}"
    return None


register_refusal(_grouped_experts)
register_lora_layer(ColumnParallelLinear, _factory(LoraColumnParallelLinear), linear=True)
register_lora_layer(RowParallelLinear, _factory(LoraRowParallelLinear), linear=True)
