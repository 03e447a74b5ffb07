"""Training checkpoints: ``OUTPUT/checkpoints/step_N/``.

    adapter/              the PEFT directory at step N (loads in peft as it is)
    optimizer.pt          optimizer state of none / ddp / ep / fsdp2_ep / hf_ep (tensors and numbers only;
                          weights_only=True)
    rng_rank{r}.pt        each rank's torch RNG state (dropout masks continue exactly on resume)
    dcp/                  engine-neutral adapter + optimizer state by parameter name (every strategy
                          writes it and reads it: resume under any strategy and world size)
    deepspeed/ ...        an engine's own files, kept for same-engine resume (ZeRO)
    trainer_state.json    step, seed, world size, global batch: the data position is the step
    manifest.json         sha256 of every other file, checked on resume (checkpoint/manifest.py)

Every rank enters (rule 4 of docs/architecture.md). The directory is assembled under ``.step_N.partial`` and renamed
to ``step_N`` only when complete, with ``trainer_state.json`` and the manifest written last, so an interrupted
write never becomes the checkpoint a resume picks up and the previous one stays loadable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch

from ..checkpoint.atomic import atomic_write_text
from ..checkpoint.manifest import MANIFEST_NAME, check_files, manifest_of
from ..checkpoint.peft_format import load_adapter, save_adapter
from ..process_group import barrier
from .config import RecipeError

STATE_NAME = "trainer_state.json"


def save_checkpoint(root: str, step: int, engine, dist, meta: dict) -> str:
    final = os.path.join(root, f"step_{step}")
    partial = os.path.join(root, f".step_{step}.partial")
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    barrier()
    save_adapter(engine.model, os.path.join(partial, "adapter"), engine=meta.get("strategy"))
    engine.save_optimizer(partial)
    torch.save(torch.get_rng_state(), os.path.join(partial, f"rng_rank{dist.rank}.pt"))
    barrier()
    if dist.is_main:
        atomic_write_text(os.path.join(partial, STATE_NAME),
                          json.dumps({"step": step, "world_size": dist.world_size, **meta}, indent=2) + "\n")
        atomic_write_text(os.path.join(partial, MANIFEST_NAME),
                          json.dumps({"files": manifest_of(partial)}, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    barrier()
    return final


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete ``step_N`` under ``root`` (one with its trainer_state.json), or None.
    A ``.step_N.partial`` left by a rank killed mid-write is never a candidate."""
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", name))
             and os.path.isfile(os.path.join(root, name, STATE_NAME))]
    return os.path.join(root, max(steps)[1]) if steps else None


def is_restart() -> bool:
    """Whether torchrun's elastic agent restarted this job (its earlier attempt is continued)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def resume_source(cfg: dict) -> Optional[str]:
    """Where the run starts from: ``train.resume_from`` as given; ``auto``, or a restart by
    torchrun's elastic agent (TORCHELASTIC_RESTART_COUNT > 0), picks the newest complete
    checkpoint of this run's output directory (none yet: from the start)."""
    given = cfg["train"]["resume_from"]
    if given == "auto" or (given is None and is_restart()):
        return latest_checkpoint(os.path.join(cfg["train"]["output_dir"], "checkpoints"))
    return given


def read_state(directory: str) -> dict:
    path = os.path.join(directory, STATE_NAME)
    if not os.path.isdir(directory):
        raise RecipeError(f"train.resume_from {directory!r} does not exist")
    if not os.path.isfile(path):
        raise RecipeError(f"train.resume_from {directory!r} is not a complete checkpoint (no {STATE_NAME})")
    with open(path, encoding="utf-8") as fh:
        try:
            state = json.load(fh)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise RecipeError(f"{path}: no integer 'step' (not a checkpoint written by dist-adapters train)")
    return state


def check_resumable(directory: str, strategy) -> dict:
    """The checkpoint's trainer state, if ``strategy`` (a row of parallel/strategies.py) can read
    its optimizer state; else a RecipeError naming both strategies."""
    from ..parallel.strategies import STRATEGIES

    state = read_state(directory)
    if not any(os.path.exists(os.path.join(directory, name)) for name in strategy.optimizer_state):
        # a checkpoint from before the neutral layout (or of a model get_state_dict cannot walk)
        written = state.get("strategy", "another strategy")
        readers = ", ".join(n for n, s in STRATEGIES.items() if set(s.optimizer_state) & set(
            name for name in os.listdir(directory)))
        raise RecipeError(f"train.resume_from {directory!r} was written under parallel.strategy {written!r} and "
                          f"holds no engine-neutral dcp/ (written before it existed, or of a model it cannot hold); "
                          f"{strategy.name!r} reads {' or '.join(strategy.optimizer_state)}: resume it under one "
                          f"of {readers}")
    return state


def load_checkpoint(directory: str, engine, dist, strategy: str) -> dict:
    """Check every file against manifest.json, then restore adapter, optimizer and (same world
    size) RNG; returns the trainer state. A checkpoint of another strategy or world size is
    read through the engine-neutral layout (``dcp/``: parameter names, DCP resharding); the
    adapter is PEFT's, the data position is the step, the schedule follows the step."""
    state = read_state(directory)
    check_files(directory)
    load_adapter(engine.model, os.path.join(directory, "adapter"))
    neutral = state.get("strategy", strategy) != strategy or state.get("world_size") != dist.world_size
    engine.load_optimizer(directory, neutral=neutral)
    rng = os.path.join(directory, f"rng_rank{dist.rank}.pt")
    if state.get("world_size") == dist.world_size and os.path.isfile(rng):
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return state
