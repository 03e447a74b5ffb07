"""The strategy table: every ``parallel.strategy`` of the recipe, once. Each row names the setup
that builds its engine and what the strategy can do; the recipe's validation, its training loop
and the README's strategy table (checked by tests/test_architecture.py) all read this table.

Adding a strategy is adding a row (docs/architecture.md, "How to add an engine").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from . import ddp, deepspeed, dtensor, expert, fsdp, tensor
from .engine import Engine, EngineConfig, MakeOptimizer

Setup = Callable[[nn.Module, MakeOptimizer, object, EngineConfig], Engine]


@dataclass(frozen=True)
class Strategy:
    name: str
    setup: Setup  # (model with adapters injected, make_optimizer, DistInfo, EngineConfig) -> Engine
    summary: str  # what runs (README)
    command: str  # a command line that runs it (README)
    multi_process: bool = True  # needs a process group (even at world size 1)
    tensor_parallel: bool = False  # parallel.tp_size applies; tp ranks share samples
    data_parallel: bool = True  # False: all ranks hold one model (tp_size must be the world size)
    expert_parallel: bool = False  # parallel.ep_size applies: experts sharded over groups of ep_size ranks
    ep_is_world: bool = False  # parallel.ep_size must be the world size (each expert on one rank)
    shards_parameters: bool = False  # packed 4-bit weights shard with the rest (quant_storage default)
    quantization: bool = False  # QLoRA verified (tests/test_quantized.py)
    modules_to_save: bool = True  # a trainable full copy of a module can train under it
    # what its engine's load_optimizer reads in a checkpoint (any one of them); "dcp" is the
    # engine-neutral layout every strategy writes (parallel/engine.py)
    optimizer_state: tuple[str, ...] = ("optimizer.pt", "dcp")
    # called with (config, world size) before the model loads; the returned object is kept
    # alive while transformers' from_pretrained runs (ZeRO-3: load straight into partitions)
    loading_context: Optional[Callable[[EngineConfig, int], object]] = None
    # extra from_pretrained arguments: transformers shards the model while loading it (the
    # built-in model is saved to OUTPUT/base_model first and loaded from there)
    loading_kwargs: Optional[Callable[[EngineConfig], dict]] = None
    # LoRA Linear layers may take the fused path (layers/fused.py), which reads the factors
    # outside their leaves' forward: not where an engine acts around a leaf's forward (FSDP1
    # units, ZeRO-3 hooks); swapped leaves (tensor parallel) fail the layer's own check
    fused_lora: bool = True
    compile: bool = False  # parallel.compile verified (tests/test_compile.py)


def _none(model, make_optimizer, dist, config) -> Engine:
    return Engine(model.to(dist.device), make_optimizer, dist, config)


def _fsdp2_tp(model, make_optimizer, dist, config) -> Engine:
    """2-D mesh (dp, tp): ``tensor.parallelize`` over tp, then FSDP2 over dp on top."""
    dp = dist.world_size // config.tp_size
    mesh = tensor.mesh_2d(dp, config.tp_size, dist.device)
    tensor.parallelize(model.to(dist.device), mesh["tp"])
    return fsdp.FSDP2Engine(model, make_optimizer, dist, config, mesh=mesh["dp"],
                            data_parallel=(mesh.get_local_rank("dp"), dp))


def _ep(model, make_optimizer, dist, config) -> Engine:
    """Experts over ep (``expert.py``), the rest replicated by DDP, which ignores the experts."""
    layout = expert.parallelize_experts(model.to(dist.device), expert.expert_mesh(config.ep_size, dist.device))
    dense = ddp.DDPEngine(model, make_optimizer, dist, config, ignored=layout.params)
    return expert.ExpertParallelEngine(dense, layout)


def _fsdp2_ep(model, make_optimizer, dist, config) -> Engine:
    """Experts over ep, the rest FSDP2 over all ranks (every rank trains on its own samples)."""
    layout = expert.parallelize_experts(model.to(dist.device), expert.expert_mesh(config.ep_size, dist.device))
    dense = fsdp.FSDP2Engine(model, make_optimizer, dist, config, ignored_params=set(layout.params))
    return expert.ExpertParallelEngine(dense, layout)


def _hf_ep(model, make_optimizer, dist, config) -> Engine:
    """The model as transformers' expert parallel sharded it (experts over all ranks, the frozen
    dense weights FSDP2); its expert LoRA split alike (``expert.adopt_experts``), the rest of the
    adapter replicated by DDP, which ignores every sharded tensor."""
    layout = expert.adopt_experts(model)
    sharded = [p for p in model.parameters() if dtensor.is_dtensor(p)]
    dense = ddp.DDPEngine(model, make_optimizer, dist, config, ignored=sharded)
    return expert.ExpertParallelEngine(dense, layout)


def _zero(stage: int) -> Setup:
    def setup(model, make_optimizer, dist, config) -> Engine:
        return deepspeed.ZeroEngine(model, make_optimizer, dist, config, stage)
    return setup


def _zero3_loading(config: EngineConfig, world_size: int):
    return deepspeed.partitioned_loading(deepspeed.zero_config(config, 3, world_size))


_DEMO = "dist-adapters train configs/demo.yaml"
# ZeRO: the adapter's full moments (any world size), or DeepSpeed's own checkpoint (the same one)
_ZERO_STATE = ("adapter_optimizer.pt", "deepspeed", "dcp")
STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("none", _none, "one process, the model as it is",
             f"{_DEMO} --set parallel.strategy=none launch.nproc_per_node=1", multi_process=False, quantization=True,
             compile=True),
    Strategy("ddp", ddp.DDPEngine, "torch DDP: adapter gradients all-reduced, accumulation with `no_sync`; "
             "the demo config's 2 processes", _DEMO, quantization=True, compile=True),
    Strategy("fsdp1", fsdp.FSDP1Engine, "FSDP1, adapter leaves in their own units (`use_orig_params: false` works)",
             "dist-adapters train configs/fsdp1.yaml", shards_parameters=True, quantization=True,
             optimizer_state=("dcp",), fused_lora=False),
    Strategy("fsdp2", fsdp.FSDP2Engine, "FSDP2 `fully_shard` per block, then the root",
             "dist-adapters train configs/fsdp2.yaml", shards_parameters=True, quantization=True,
             optimizer_state=("dcp",), compile=True),
    Strategy("zero1", _zero(1), "DeepSpeed ZeRO-1: optimizer state partitioned",
             "dist-adapters train configs/zero3.yaml --set parallel.strategy=zero1", optimizer_state=_ZERO_STATE),
    Strategy("zero2", _zero(2), "DeepSpeed ZeRO-2: optimizer state and gradients partitioned",
             "dist-adapters train configs/zero3.yaml --set parallel.strategy=zero2", optimizer_state=_ZERO_STATE),
    Strategy("zero3", _zero(3), "DeepSpeed ZeRO-3: parameters too; `model.path` loads straight into partitions",
             "dist-adapters train configs/zero3.yaml", shards_parameters=True, quantization=True,
             loading_context=_zero3_loading, optimizer_state=_ZERO_STATE, fused_lora=False),
    Strategy("tp", tensor.TPEngine,
             "DTensor tensor parallel over all ranks (`parallel.tp_size` = world size); every rank sees the same "
             "samples", "dist-adapters train configs/tp.yaml", tensor_parallel=True, data_parallel=False,
             modules_to_save=False, optimizer_state=("dcp",)),
    Strategy("fsdp2_tp", _fsdp2_tp,
             "2-D mesh (dp x tp): tensor parallel inside groups of `tp_size` ranks, FSDP2 across them",
             "dist-adapters train configs/tp.yaml --set parallel.strategy=fsdp2_tp parallel.tp_size=2",
             tensor_parallel=True, modules_to_save=False, optimizer_state=("dcp",)),
    Strategy("hf_tp", tensor.HFTPEngine,
             "tensor parallel by transformers itself (`DistributedConfig(tp_size=...)`, the model's own "
             "`base_model_tp_plan`) over all ranks; the adapters follow its placements",
             "dist-adapters train configs/tp.yaml --set parallel.strategy=hf_tp", tensor_parallel=True,
             data_parallel=False, modules_to_save=False, optimizer_state=("dcp",),
             loading_kwargs=tensor.transformers_loading),
    Strategy("ep", _ep,
             "expert parallel: each MoE layer's experts and their LoRA split over `parallel.ep_size` ranks "
             "(tokens routed by all-to-all), the rest replicated by DDP",
             "dist-adapters train configs/moe.yaml --set parallel.strategy=ep parallel.ep_size=2",
             expert_parallel=True),
    Strategy("hf_ep", _hf_ep,
             "expert parallel by transformers itself (`DistributedConfig(ep_size=world)`: its all-to-all "
             "dispatch, the frozen dense weights FSDP2), the expert LoRA split alike, the rest of the adapter "
             "replicated by DDP",
             "dist-adapters train configs/moe.yaml --set parallel.strategy=hf_ep parallel.ep_size=2",
             expert_parallel=True, ep_is_world=True, loading_kwargs=expert.transformers_loading),
    Strategy("fsdp2_ep", _fsdp2_ep,
             "experts over `parallel.ep_size` ranks as in `ep`, the rest FSDP2 over all ranks",
             "dist-adapters train configs/moe.yaml --set parallel.strategy=fsdp2_ep parallel.ep_size=2 "
             "launch.nproc_per_node=4", expert_parallel=True, shards_parameters=True),
]}


def markdown_table() -> str:
    """The README's strategy table, generated from ``STRATEGIES``."""
    def mark(flag: bool) -> str:
        return "yes" if flag else "no"

    rows = ["| strategy | what runs | QLoRA | modules_to_save | command |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.summary} | {mark(s.quantization)} | {mark(s.modules_to_save)} | `{s.command}` |"
             for s in STRATEGIES.values()]
    return "\n".join(rows)
