"""Every check of the user's input that can run before a process is started.

``dist-adapters train`` runs ``preflight`` once in the launching process, so a typo fails in a
second with one line instead of in every rank with its traceback; each rank runs it again
(it is also the entry of a rank started by the user's own torchrun). It reads, never writes:

    strategy and world       the strategy table (parallel/strategies.py), batch divisibility,
                             experts that parallel.ep_size divides
    model.path, tokenizer    the directory, its tokenizer (loaded), its config (read)
    adapter                  injected into the model built on the meta device (no weights, no
                             memory): target_modules typos, token indices out of range, layers
    output_dir, resume_from  recipe/output.py; the checkpoint's strategy
    data                     read, rendered, masked and tokenized once (recipe/dataset.py): cut
                             and loss-free samples counted, evaluation split
"""

from __future__ import annotations

import os

import torch

from ..inject import inject
from ..parallel.strategies import STRATEGIES
from . import builtin, loftq, quantization
from .checkpoint import check_resumable, resume_source
from .config import RecipeError, adapter_config, check_world
from .dataset import RunData, load_run_data
from .output import check_output_dir


def preflight(cfg: dict, world_size: int) -> RunData:
    """Raise RecipeError on the first problem; return the data, tokenized."""
    strategy = STRATEGIES[cfg["parallel"]["strategy"]]
    if not strategy.multi_process and world_size > 1:
        raise RecipeError(f"parallel.strategy {strategy.name!r} runs one process; use strategy ddp or "
                          "launch.nproc_per_node: 1")
    if cfg["model"]["quantization"] is not None:
        quantization.settings(cfg)
    if cfg["model"]["path"] is not None and not os.path.isdir(cfg["model"]["path"]):
        raise RecipeError(f"model.path {cfg['model']['path']!r} is not a directory")
    check_world(cfg, world_size)
    adapter_cfg = adapter_config(cfg)
    if loftq.wants_loftq(adapter_cfg):
        loftq.check(cfg, adapter_cfg)
    if getattr(adapter_cfg, "modules_to_save", None) and not strategy.modules_to_save:
        supported = ", ".join(name for name, s in STRATEGIES.items() if s.modules_to_save)
        raise RecipeError(f"adapter.modules_to_save is not supported under parallel.strategy {strategy.name!r} "
                          f"(a trainable full copy of a sharded layer); use one of: {supported}")
    check_output_dir(cfg)
    source = resume_source(cfg)
    if source is not None:
        check_resumable(source, strategy)
    tokenizer = load_tokenizer(cfg)
    check_adapter_fits(cfg, tokenizer)
    return load_run_data(cfg, tokenizer)


def load_tokenizer(cfg: dict):
    """model.tokenizer_path's tokenizer, else model.path's, else the built-in one (an error naming
    the key when the directory has none)."""
    key = "model.tokenizer_path" if cfg["model"]["tokenizer_path"] else "model.path"
    path = cfg["model"]["tokenizer_path"] or cfg["model"]["path"]
    if path is None:
        return builtin.builtin_tokenizer()
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise RecipeError(f"{key} {path!r} is not a directory")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise RecipeError(f"{key} {path!r}: no usable tokenizer ({' '.join(str(exc).split())[:200]})") from None


def check_adapter_fits(cfg: dict, tokenizer) -> None:
    """Inject the adapter into the model built on the meta device: what inject would refuse on
    the real model (a target that matches nothing, a token index past the vocabulary) fails here."""
    with torch.device("meta"):
        model = _meta_model(cfg, tokenizer)
    try:
        inject(model, adapter_config(cfg))
    except ValueError as exc:
        raise RecipeError(f"adapter: {exc}") from None
    if STRATEGIES[cfg["parallel"]["strategy"]].expert_parallel:
        _check_experts_split(model, cfg["parallel"]["ep_size"])


def _check_experts_split(model, ep_size: int) -> None:
    """Expert parallel needs experts modules whose expert count ep_size divides."""
    from ..parallel.expert import experts_modules

    found = experts_modules(model)
    if not found:
        raise RecipeError("parallel.strategy ep / fsdp2_ep: the model has no mixture-of-experts layer (transformers' "
                          "experts interface); use ddp or fsdp2")
    counts = sorted({experts.num_experts for _, experts in found})
    if any(count % ep_size for count in counts):
        raise RecipeError(f"parallel.ep_size {ep_size} must divide the number of experts per layer ({counts[0]})")


def _meta_model(cfg: dict, tokenizer):
    path = cfg["model"]["path"]
    if path is None:
        return builtin.builtin_model(cfg["train"]["seed"], tokenizer, kind=cfg["model"]["builtin"])
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError, KeyError) as exc:
        raise RecipeError(f"model.path {path!r}: {' '.join(str(exc).split())[:300]}") from None
