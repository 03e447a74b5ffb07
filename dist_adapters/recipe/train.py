"""The reference fine-tuning recipe: ``dist-adapters train CONFIG.yaml``.

One process or many, the same loop: build (or load) the model, inject the adapter, hand the model
to the strategy's setup (its row of ``parallel/strategies.py``), and run optimizer steps whose samples depend
only on (seed, step, global batch). The loss of a step is the sum of token losses over the whole
global batch divided by its number of target tokens, however the batch is split into ranks and
micro batches, so every strategy and world size trains the same adapter (to rounding).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..checkpoint.atomic import atomic_write_text
from ..checkpoint.peft_format import save_adapter
from ..control import unwrap
from ..inject import inject
from ..launcher import DistInfo, init_distributed
from ..layers.lora import set_fused
from ..parallel.engine import EngineConfig
from ..parallel.compile import compile_blocks
from ..parallel.strategies import STRATEGIES
from ..process_group import barrier
from . import builtin, loftq, quantization
from .checkpoint import load_checkpoint, resume_source, save_checkpoint
from .config import RecipeError, adapter_config, check_world
from .data import global_batch_indices, micro_batches
from .dataset import RunData
from .evaluate import describe, evaluate, samples_file
from .output import clear_earlier_run, discard_unstarted
from .preflight import load_tokenizer, preflight


def engine_config(cfg: dict, accumulation: int) -> EngineConfig:
    """The typed configuration the engines read, from the recipe's sections."""
    parallel, train_cfg = cfg["parallel"], cfg["train"]
    precision = parallel["mixed_precision"]
    return EngineConfig(micro_batch_size=train_cfg["micro_batch_size"], accumulation=accumulation,
                        max_grad_norm=train_cfg["max_grad_norm"], tp_size=parallel["tp_size"],
                        ep_size=parallel["ep_size"],
                        use_orig_params=parallel["use_orig_params"],
                        activation_checkpointing=parallel["activation_checkpointing"],
                        mixed_precision=getattr(torch, precision) if precision else None,
                        deepspeed_config=parallel["deepspeed_config"])


def _load_model(cfg: dict, accumulation: int, world_size: int, device: torch.device, full: bool = False):
    """The base model; ``full``: whole and unquantized (LoftQ reads and rewrites every weight)."""
    dtype = getattr(torch, cfg["model"]["dtype"])
    path = cfg["model"]["path"]
    if path is None:
        tokenizer = builtin.builtin_tokenizer()
        return builtin.builtin_model(cfg["train"]["seed"], tokenizer, dtype, cfg["model"]["builtin"]), tokenizer
    from transformers import AutoModelForCausalLM

    partitioned = None
    loading_context = STRATEGIES[cfg["parallel"]["strategy"]].loading_context
    if loading_context is not None and not full:
        # e.g. ZeRO-3: load straight into partitions (zero.Init), no rank holds the whole model
        partitioned = loading_context(engine_config(cfg, accumulation), world_size)
    try:
        tokenizer = load_tokenizer(cfg)
        if cfg["model"]["quantization"] is not None and not full:
            return quantization.load_quantized(path, quantization.settings(cfg), dtype, device), tokenizer
        loading_kwargs = STRATEGIES[cfg["parallel"]["strategy"]].loading_kwargs
        extra = loading_kwargs(engine_config(cfg, accumulation)) if loading_kwargs and not full else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
        model.__dict__["_da_keep"] = partitioned  # transformers reads it through a weak reference
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model.path {path!r}: {' '.join(str(exc).split())[:300]}") from None
    return model, tokenizer


def _truncate_rows(path: str, step: int) -> None:
    """Keep the JSONL rows of ``path`` up to ``step`` (metrics.jsonl, samples.jsonl)."""
    with open(path, encoding="utf-8") as fh:
        rows = [line for line in fh.read().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(row + "\n" for row in rows))


def _lr_at(step: int, train: dict) -> float:
    warm, total, lr = train["warmup_steps"], train["steps"], train["lr"]
    if warm and step < warm:
        return lr * (step + 1) / warm
    if train["lr_schedule"] == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


# The loss normalisation, in four named pieces (tests/dist/recipe_fault.py breaks each one on
# purpose to show that the equivalence tests notice).
def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks (in place); the value itself in one process."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
    return value


def replica_copies(engine, dist: DistInfo) -> int:
    """How many ranks hold each sample: 1, or the tensor-parallel size (tp ranks share samples),
    so a sum over all ranks counts each sample this many times."""
    return dist.world_size // engine.dp_size


def global_target_tokens(batches, engine, dist: DistInfo) -> float:
    """Tokens that carry loss in the whole global batch (all ranks, all micro batches)."""
    local = torch.tensor(float(sum(b.target_tokens() for b in batches)), device=dist.device)
    return all_reduce_sum(local).item() / replica_copies(engine, dist)


def gradient_scale(engine, total: float) -> float:
    """What a micro batch's summed token loss is multiplied by before backward. DDP / FSDP /
    ZeRO average gradients over the data-parallel ranks, so dp / total makes the gradient that of
    (sum of token losses over the global batch) / (its token count) at any world size and micro
    batch; tensor-parallel ranks compute one gradient together and average nothing."""
    return engine.dp_size / total


def make_optimizer_factory(train_cfg: dict):
    """``train.optimizer``: adamw (torch AdamW) or sgd (plain: no momentum, no dampening)."""
    lr, decay = train_cfg["lr"], train_cfg["weight_decay"]
    if train_cfg["optimizer"] == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, weight_decay=decay)
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def peft_snippet(cfg: dict) -> str:
    """The three lines that load the run's adapter with peft."""
    out = cfg["train"]["output_dir"]
    # LoftQ / PiSSA / OLoRA rewrite the base: it is saved to OUTPUT/base_model like the built-in one
    rewritten = cfg["model"]["path"] is None or loftq.changes_base(adapter_config(cfg))
    base = os.path.join(out, "base_model") if rewritten else cfg["model"]["path"]
    if cfg["model"]["quantization"] is not None:  # the same quantized base
        return ("import torch\nfrom transformers import AutoModelForCausalLM, BitsAndBytesConfig\nfrom peft import PeftModel\n"
                f"base = AutoModelForCausalLM.from_pretrained({base!r}, device_map='cpu', quantization_config="
                f"{quantization.config_source(quantization.settings(cfg))})\n"
                f"model = PeftModel.from_pretrained(base, {os.path.join(out, 'adapter')!r})")
    return ("from transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
            f"{os.path.join(out, 'adapter')!r})")


def train(cfg: dict) -> dict:
    """Run the recipe in this process (one rank of the job). Returns a summary on every rank."""
    from tqdm import tqdm

    dist = init_distributed(cfg["launch"]["timeout_minutes"],  # a world of 1 still gets a (local) group
                            need_group=STRATEGIES[cfg["parallel"]["strategy"]].multi_process)
    out = cfg["train"]["output_dir"]
    existed = os.path.isdir(out)
    try:
        data = preflight(cfg, dist.world_size)
        barrier()  # every rank checked the output directory before rank 0 changes it
        if dist.is_main:
            clear_earlier_run(cfg)
            os.makedirs(out, exist_ok=True)
        barrier()
        summary = _train(cfg, dist, data, tqdm)
    except BaseException:
        if dist.is_main:
            discard_unstarted(out, existed)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    if torch.distributed.is_initialized():
        # leave together: a rank tearing its group down while another still talks to it can
        # abort in the communication threads ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _adapted_model(cfg: dict, dist: DistInfo, accumulation: int):
    """(model with the adapter injected, in train mode; tokenizer). Writes OUTPUT/base_model for
    the built-in model and for LoftQ (whose base becomes Q)."""
    tr, out = cfg["train"], cfg["train"]["output_dir"]
    adapter_cfg = adapter_config(cfg)
    use_loftq = loftq.changes_base(adapter_cfg)
    model, tokenizer = _load_model(cfg, accumulation, dist.world_size, dist.device, full=use_loftq)
    torch.manual_seed(tr["seed"])  # same adapter init on every rank
    if use_loftq:  # the base becomes Q or the residual, saved as OUTPUT/base_model (recipe/loftq.py)
        model = loftq.loftq_start(cfg, model, tokenizer, adapter_cfg, dist)
    else:
        if cfg["model"]["path"] is None:
            base_dir = os.path.abspath(os.path.join(out, "base_model"))
            if dist.is_main:
                model.save_pretrained(base_dir)
                tokenizer.save_pretrained(base_dir)
            adapter_cfg.base_model_name_or_path = base_dir
        else:
            adapter_cfg.base_model_name_or_path = cfg["model"]["path"]
        if cfg["model"]["path"] is None and STRATEGIES[cfg["parallel"]["strategy"]].loading_kwargs is not None:
            # transformers shards the model while loading it: load the built-in base just saved
            barrier()
            model, _ = _load_model({**cfg, "model": {**cfg["model"], "path": base_dir}}, accumulation,
                                   dist.world_size, dist.device)
        if cfg["model"]["quantization"] is not None and cfg["model"]["path"] is None:
            # QLoRA on the built-in model: load the base just saved through bitsandbytes
            barrier()
            model = quantization.load_quantized(adapter_cfg.base_model_name_or_path, quantization.settings(cfg),
                                                getattr(torch, cfg["model"]["dtype"]), dist.device)
        torch.manual_seed(tr["seed"])  # same adapter init on every rank
        inject(model, adapter_cfg)
    # from_pretrained (model.path, QLoRA, LoftQ) returns the model in eval mode, which would turn
    # off lora_dropout and transformers' activation checkpointing without a word
    model.train()
    return model, tokenizer


@dataclass(frozen=True)
class RouterAux:
    """A mixture-of-experts family's load-balancing loss (transformers' ``aux_loss``, computed per
    forward from the router logits): always logged; added to the training loss, times the family's
    ``router_aux_loss_coef``, when the model config's ``output_router_logits`` is true."""

    train: bool
    coef: float


def router_aux(model, override: Optional[bool]) -> Optional[RouterAux]:
    """The model's RouterAux (``override``: model.output_router_logits), or None (no router)."""
    config = getattr(unwrap(model), "config", None)
    if config is None or not hasattr(config, "router_aux_loss_coef"):
        return None
    if override is not None:
        config.output_router_logits = override
    return RouterAux(bool(getattr(config, "output_router_logits", False)), float(config.router_aux_loss_coef))


def _train_step(engine, data, step: int, tr: dict, dist: DistInfo,
                aux: Optional[RouterAux] = None) -> tuple[float, float, float, Optional[float]]:
    """One optimizer step over the global batch of ``step``: (loss, grad norm, target tokens,
    router aux loss: the mean over the global batch's micro batches, or None)."""
    indices = global_batch_indices(step, len(data), tr["global_batch_size"], tr["seed"])
    batches = [data.batch(mb).to(dist.device)
               for mb in micro_batches(indices, engine.dp_rank, engine.dp_size, tr["micro_batch_size"])]
    total = global_target_tokens(batches, engine, dist)
    if total == 0:
        raise RecipeError(f"step {step + 1}: no sample of the global batch has 2 or more tokens (data samples "
                          f"{sorted(i + 1 for i in indices)[:8]}): nothing to compute a loss on")
    loss_sum, aux_sum = torch.zeros((), device=dist.device), torch.zeros((), device=dist.device)
    micro_total = len(batches) * engine.dp_size  # micro batches in the global batch
    for i, batch in enumerate(batches):
        with engine.accumulating(last_micro_step=i == len(batches) - 1):
            extra = {"output_router_logits": True} if aux else {}
            out = engine.model(**batch.model_inputs(), **extra)
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(),
                                   ignore_index=-100, reduction="sum")
            objective = loss * gradient_scale(engine, total)
            if aux:
                aux_sum += out.aux_loss.detach().float()
                if aux.train:  # the mean over micro batches, after the engines' average over dp ranks
                    objective = objective + aux.coef * out.aux_loss.float() * engine.dp_size / micro_total
            engine.backward(objective)
            loss_sum += loss.detach()
    step_loss = (all_reduce_sum(loss_sum) / replica_copies(engine, dist) / total).item()
    aux_loss = (all_reduce_sum(aux_sum) / replica_copies(engine, dist) / micro_total).item() if aux else None
    return step_loss, engine.finish_step(), total, aux_loss


def _evaluate(engine, run_data: RunData, tokenizer, cfg: dict, dist: DistInfo, step: int, when: str) -> dict:
    """The evaluation at ``step`` (recipe/evaluate.py); rank 0 prints its line."""
    out = cfg["train"]["output_dir"]
    result = evaluate(engine, run_data.eval, tokenizer, cfg["train"], dist, step,
                      samples_file(out) if dist.is_main else None)
    if dist.is_main:
        print(describe(result, when), flush=True)
    return result


def _wants_eval(step: int, tr: dict) -> bool:
    """After optimizer step ``step`` (1-based): every train.eval_every steps, and after the last."""
    return step == tr["steps"] or bool(tr["eval_every"] and step % tr["eval_every"] == 0)


def _train(cfg: dict, dist: DistInfo, run_data: RunData, tqdm) -> dict:
    tr = cfg["train"]
    out = tr["output_dir"]
    accumulation = check_world(cfg, dist.world_size)
    model, tokenizer = _adapted_model(cfg, dist, accumulation)
    aux = router_aux(model, cfg["model"]["output_router_logits"])
    strategy = STRATEGIES[cfg["parallel"]["strategy"]]
    set_fused(model, cfg["parallel"]["fused_lora"] and strategy.fused_lora)
    if cfg["parallel"]["compile"]:  # before the engine wraps or shards (the blocks stay in place)
        compiled = compile_blocks(model)
        if dist.is_main:
            print(f"parallel.compile: {compiled} transformer blocks compiled (torch.compile, inductor)", flush=True)
    engine = strategy.setup(model, make_optimizer_factory(tr), dist, engine_config(cfg, accumulation))
    data = run_data.train
    if dist.is_main:
        print(run_data.summary(), flush=True)
    start = 0
    source = resume_source(cfg)
    if source:
        start = load_checkpoint(source, engine, dist, cfg["parallel"]["strategy"])["step"]
        if dist.is_main:
            print(f"resuming from {source} (step {start})", flush=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if start and dist.is_main:  # rows an interrupted attempt wrote past the checkpoint
        for path in (metrics_path, samples_file(out)):
            if os.path.isfile(path):
                _truncate_rows(path, start)
    metrics = open(metrics_path, "a" if start else "w", encoding="utf-8") if dist.is_main else None
    first_eval = last_eval = None
    if run_data.eval is not None and start == 0:
        first_eval = _evaluate(engine, run_data, tokenizer, cfg, dist, 0, "before training")
    t_start = time.perf_counter()
    first_loss = last_loss = None
    bar = tqdm(range(start, tr["steps"]), initial=start, total=tr["steps"], disable=not dist.is_main,
               desc="train", dynamic_ncols=True)
    try:
        for step in bar:
            t0 = time.perf_counter()
            lr = _lr_at(step, tr)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            step_loss, grad_norm, total, aux_loss = _train_step(engine, data, step, tr, dist, aux)
            first_loss = step_loss if first_loss is None else first_loss
            last_loss = step_loss
            seconds = time.perf_counter() - t0
            evaluated = run_data.eval is not None and _wants_eval(step + 1, tr)
            if evaluated:
                last_eval = _evaluate(engine, run_data, tokenizer, cfg, dist, step + 1, f"after step {step + 1}")
            if metrics is not None:
                cut = data.truncated_in(global_batch_indices(step, len(data), tr["global_batch_size"], tr["seed"]))
                row = {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": round(total / seconds, 1), "seconds": round(time.perf_counter() - t_start, 3),
                       "truncated": cut}
                if aux_loss is not None:
                    row["aux_loss"] = aux_loss
                if evaluated:
                    row.update(last_eval)
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
            if (step + 1) % tr["checkpoint_every"] == 0:
                save_checkpoint(os.path.join(out, "checkpoints"), step + 1, engine, dist,
                                {"seed": tr["seed"], "global_batch_size": tr["global_batch_size"],
                                 "strategy": cfg["parallel"]["strategy"]})
    finally:
        if metrics is not None:
            metrics.close()
    adapter_dir = save_adapter(engine.model, os.path.join(out, "adapter"), engine=cfg["parallel"]["strategy"])
    if dist.is_main:
        from .plot import plot_loss

        plot_loss(metrics_path, os.path.join(out, "loss.png"))
        atomic_write_text(os.path.join(out, "recipe.json"), json.dumps(cfg, indent=2) + "\n")
    return {"first_loss": first_loss, "last_loss": last_loss, "adapter": adapter_dir, "steps": tr["steps"],
            "model": engine.model, "first_eval": first_eval, "last_eval": last_eval}
