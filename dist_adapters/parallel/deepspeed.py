"""DeepSpeed ZeRO-1/2/3 with adapters: gathers, master weights, and the recipe engine.

ZeRO-3 partitions every parameter across ranks (``p.shape`` may be empty, the real shape is
``p.ds_shape``); ZeRO-1/2 partition the optimizer state (and gradients), keeping fp32 master
copies of the trainable parameters in the optimizer. So:

- reading a full weight (save, merge, trainable-token init) gathers it with
  ``deepspeed.zero.GatheredParameters`` (an all-gather of those parameters only; every rank
  enters). Writing one uses ``modifier_rank=0``: rank 0's values are broadcast and re-partitioned
  on exit.
- writing a *trainable* parameter after ``deepspeed.initialize`` also goes through
  ``safe_set_full_fp32_param``: otherwise the next optimizer step copies the old fp32 master back
  over it.

Collectives in training are DeepSpeed's own: reduce-scatter (ZeRO-2/3) or all-reduce (ZeRO-1) of
the adapter gradients, all-gather of ZeRO-3 partitions around each module's forward and backward.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from ..names import clean_name
from . import access
from .engine import NEUTRAL_DIR, Engine, EngineConfig, MakeOptimizer

# The defaults of parallel.deepspeed_config: null (configs/zero{1,2,3}.json hold the same).
DEFAULT_CONFIGS = {
    stage: {"zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
            "zero_allow_untested_optimizer": True}
    for stage in (1, 2, 3)
}


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def is_deepspeed_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


@contextmanager
def gathered(params: list, modify: bool = False) -> Iterator[None]:
    """Full ZeRO-3 parameters inside; with ``modify`` rank 0's changes are kept on exit."""
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if modify else None):
        yield


@torch.no_grad()
def set_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write a full value into a DeepSpeed parameter (inside ``gathered(..., modify=True)`` for
    ZeRO-3) and into its fp32 master copy, so the next step keeps it."""
    p.data.copy_(value.to(p.device, p.dtype))
    if p.requires_grad and (hasattr(p, "_hp_mapping") or getattr(p, "_z3_optimizer", None) is not None):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.to(torch.float32))


class ZeroAccess(access.Access):
    """ZeRO-1/2/3 parameters (rule 3 of docs/architecture.md): ZeRO-3 partitions are gathered
    around each read (``GatheredParameters``: all-gather; with writeback rank 0's values are
    broadcast and re-partitioned on exit), and writes also reach the fp32 master copy."""

    name = "deepspeed"

    def claims_param(self, p) -> bool:
        return is_deepspeed_param(p)

    def claims_layer(self, layer: nn.Module, model: nn.Module) -> bool:
        return any(is_zero3_param(p) for p in layer.parameters())

    def full_shape(self, p) -> torch.Size:
        return torch.Size(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the real shape there

    def write_full(self, p, value) -> None:
        set_full(p, value)

    def gathered_param(self, p, writeback: bool):
        return gathered([p], modify=writeback)

    def full_weights(self, layer: nn.Module, model: nn.Module):
        return gathered(list(layer.parameters()), modify=True)


access.register(ZeroAccess())


def partitioned_loading(config: dict):
    """Keep the returned object alive while calling ``from_pretrained``: transformers then builds
    the model under ``deepspeed.zero.Init`` and loads each weight into its partitions."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")  # adopts our group
    return HfDeepSpeedConfig(config)


def zero_config(config: EngineConfig, stage: int, world_size: int) -> dict:
    """The user's JSON (``config.deepspeed_config``, or the default for ``stage``) with the keys
    the recipe owns: the batch sizes and ``gradient_clipping`` (``max_grad_norm``; None or 0:
    none)."""
    if config.deepspeed_config:
        with open(config.deepspeed_config, encoding="utf-8") as fh:
            ds = json.load(fh)
    else:
        ds = copy.deepcopy(DEFAULT_CONFIGS[stage])
    ds.setdefault("zero_optimization", {})["stage"] = stage
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    ds["gradient_accumulation_steps"] = config.accumulation
    ds["train_batch_size"] = config.micro_batch_size * config.accumulation * world_size
    # always set: DeepSpeed's own default is 1.0, which would clip a run that asked for no clipping
    ds["gradient_clipping"] = float(config.max_grad_norm or 0.0)
    return ds


class ZeroEngine(Engine):
    """Strategies ``zero1`` / ``zero2`` / ``zero3`` over ``deepspeed.initialize``. DeepSpeed counts
    micro steps itself: its ``engine.step()`` must follow every backward, and applies the optimizer
    (with the config's clipping) at the accumulation boundary; so ``backward`` calls it, and
    ``finish_step`` only reports the norm DeepSpeed measured."""

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, dist, config: EngineConfig,
                 stage: int) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed

        self.dist, self.config, self.data_parallel = dist, config, None
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model.to(dist.device), optimizer=optimizer, config=zero_config(config, stage, dist.world_size))

    def accumulating(self, last_micro_step: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # the recipe already normalises the loss over the global batch: no 1/accumulation here
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()

    def finish_step(self) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(clean_name(n), p) for n, p in self.model.module.named_parameters() if p.requires_grad]

    def _moment_keys(self) -> tuple[str, ...]:
        """The per-parameter optimizer state to carry across world sizes: Adam's two moments;
        plain SGD (no momentum) has none."""
        inner = self.optimizer.optimizer
        return ("exp_avg", "exp_avg_sq") if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) else ()

    def save_optimizer(self, directory: str) -> None:
        """DeepSpeed's own checkpoint (resumed by DeepSpeed at the same world size), plus the
        adapter's full fp32 Adam moments in ``adapter_optimizer.pt`` (small: the adapter's size),
        which resume at any world size. Every rank enters (the moments are all-gathered)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self.model.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state")
        keys = self._moment_keys()
        if keys:
            self._map_states()
        moments = {name: {key: safe_get_full_optimizer_state(p, key).detach().cpu().clone() for key in keys}
                   for name, p in self._trainable()}
        inner = self.optimizer.optimizer
        step = next((float(st["step"]) for st in inner.state.values() if "step" in st), 0.0)
        if self.dist.is_main:
            torch.save({"step": step, "moments": moments}, os.path.join(directory, "adapter_optimizer.pt"))
        self._save_neutral(directory, moments, step)

    def _save_neutral(self, directory: str, moments: dict, step: float) -> None:
        """The engine-neutral ``dcp/`` (engine.save_neutral_state's layout, which any strategy
        reads): full fp32 adapter and moments under the parameter names, the optimizer's
        hyperparameters as a torch optimizer's state_dict holds them. Replicated on every rank;
        DCP keeps one copy."""
        import torch.distributed.checkpoint as dcp
        from deepspeed.utils import safe_get_full_fp32_param

        trainable = self._trainable()
        model_sd = {name: safe_get_full_fp32_param(p).detach().cpu().clone() for name, p in trainable}
        hyper = {k: v for k, v in self.optimizer.optimizer.param_groups[0].items() if k != "params"}
        state = {name: {"step": torch.tensor(step), **moments[name]} for name, _ in trainable if moments[name]}
        optim_sd = {"state": state, "param_groups": [{**hyper, "params": [name for name, _ in trainable]}]}
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, NEUTRAL_DIR))

    def load_optimizer(self, directory: str, neutral: bool = False) -> None:
        """Same strategy and world size: DeepSpeed's own checkpoint; another world size under
        ZeRO: ``adapter_optimizer.pt``; another strategy (``neutral``): the neutral ``dcp/``."""
        with open(os.path.join(directory, "trainer_state.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
        if not neutral and saved.get("world_size") == self.dist.world_size:
            path = os.path.join(directory, "deepspeed")
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{directory}: no deepspeed/ checkpoint (written by a zero* strategy)")
            self.model.load_checkpoint(path, tag="state", load_module_strict=False)
            return
        ours = os.path.join(directory, "adapter_optimizer.pt")
        if not neutral and os.path.isfile(ours):
            data = torch.load(ours, map_location="cpu", weights_only=True)
            return self._set_moments(data["moments"], data["step"], ours)
        self._load_neutral(directory)

    def _load_neutral(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        keys = self._moment_keys()
        if not keys:
            return  # plain SGD: no state
        trainable = self._trainable()
        state = {name: {"step": torch.zeros(()), **{k: torch.empty(tuple(getattr(p, "ds_shape", p.shape)))
                                                    for k in keys}} for name, p in trainable}
        dest = {"optim": {"state": state}}
        dcp.load(dest, checkpoint_id=os.path.join(directory, NEUTRAL_DIR))
        step = float(next(iter(state.values()))["step"]) if state else 0.0
        self._set_moments({n: {k: v for k, v in st.items() if k != "step"} for n, st in state.items()}, step,
                          os.path.join(directory, NEUTRAL_DIR))

    def _map_states(self) -> None:
        """Make the full-state accessors work: Adam's state exists for every flat fp32 partition
        (created as zeros before the first step), and under ZeRO-1/2 each parameter's fragment
        points into it (DeepSpeed maps this only when loading a universal checkpoint)."""
        inner = self.optimizer.optimizer
        # ZeRO-3 hands its flat fp32 partitions to the optimizer only inside step()
        flats = list(getattr(self.optimizer, "fp32_partitioned_groups_flat", None) or
                     [flat for group in inner.param_groups for flat in group["params"]])
        for flat in flats:
            if not inner.state.get(flat):
                inner.state[flat] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(flat),
                                     "exp_avg_sq": torch.zeros_like(flat)}
        if hasattr(self.optimizer, "bit16_groups"):
            for i, group in enumerate(inner.param_groups):
                flat = group["params"][0]
                for lp in self.optimizer.bit16_groups[i]:
                    if getattr(lp, "_hp_mapping", None) is not None:
                        lp._hp_mapping.set_optim_state_fragment(flat, inner.state[flat])

    def _set_moments(self, moments: dict, step: float, path: str) -> None:
        """Another world size or strategy: DeepSpeed's partitions do not fit; set the full moments
        instead (the fp32 master weights were set when the adapter was loaded)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        inner = self.optimizer.optimizer
        if not self._moment_keys():
            return  # plain SGD: no state
        self._map_states()
        for name, p in self._trainable():
            if name not in moments:
                raise ValueError(f"{path}: no optimizer state for {name!r}")
            for key, value in moments[name].items():
                safe_set_full_optimizer_state(p, value.to(p.device), key)
        for state in inner.state.values():
            state["step"] = torch.tensor(step)
