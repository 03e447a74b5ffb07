"""Running the recipe from tests: in-process (strategy none) or through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from dist_adapters.recipe.config import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")


def cli(*args: str, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`dist-adapters ...` as a user runs it (self-launching torchrun when asked)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dist_adapters.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def small(out, **over) -> list[str]:
    """--set arguments for a short run on the built-in model and data."""
    values = {"train.output_dir": str(out), "train.steps": 4, "train.global_batch_size": 8,
              "train.checkpoint_every": 2, "data.seq_len": 32, "train.lr": 1e-2,
              "parallel.strategy": "none", "launch.nproc_per_node": 1, **over}
    return [f"{k}={v}" for k, v in values.items()]


def config(out, **over) -> dict:
    return load_recipe(DEMO, small(out, **over))


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def assert_peft_reproduces(run_dir) -> None:
    """peft on ``run_dir/base_model`` + ``run_dir/adapter`` gives our loader's logits (1e-5), and
    the adapter really changed the model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import dist_adapters as da
    from helpers import input_ids

    base = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "base_model")).eval()
    with torch.no_grad():
        base_logits = base(input_ids=input_ids()).logits
        theirs = PeftModel.from_pretrained(base, os.path.join(run_dir, "adapter")).eval()
        ours = da.load_adapter(AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "base_model")),
                               os.path.join(run_dir, "adapter")).eval()
        assert (theirs(input_ids=input_ids()).logits - ours(input_ids=input_ids()).logits).abs().max() <= 1e-5
        assert (ours(input_ids=input_ids()).logits - base_logits).abs().max() > 1e-3


def max_adapter_diff(a, b) -> float:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert sorted(ta) == sorted(tb)
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)
