"""Running the recipe from tests: in-process (strategy none) or through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

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


def cli_forked(argvs: dict[str, list[str]], timeout: int = 900) -> dict[str, SimpleNamespace]:
    """Many `dist-adapters ...` command lines, each its own process, forked (2 at a time) from one
    that imported the CLI once (tests/dist/cli_forks.py): the same exit codes and file-descriptor
    output as fresh interpreters, without an import of torch and transformers each (~4.5 s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with tempfile.TemporaryDirectory() as work:
        cases, results = os.path.join(work, "cases.json"), os.path.join(work, "results.json")
        with open(cases, "w", encoding="utf-8") as fh:
            json.dump(argvs, fh)
        subprocess.run([sys.executable, "tests/dist/cli_forks.py", cases, results, "--jobs", "2"], cwd=ROOT, env=env,
                       timeout=timeout, check=True)
        with open(results, encoding="utf-8") as fh:
            return {name: SimpleNamespace(**res) for name, res in json.load(fh).items()}


def small(out, **over) -> list[str]:
    """--set arguments for a short run on the built-in model and data (the demo's evaluation off)."""
    values = {"train.output_dir": str(out), "train.steps": 4, "train.global_batch_size": 8,
              "train.checkpoint_every": 2, "data.seq_len": 32, "train.lr": 1e-2, "train.micro_batch_size": 4,
              "train.lr_schedule": "constant", "train.eval_every": 0, "train.eval_generate": 0, "data.eval_fraction": 0,
              "parallel.strategy": "none", "launch.nproc_per_node": 1, **over}
    return [f"{k}={v}" for k, v in values.items()]


def train_run(out, **over):
    """`dist-adapters train` of the demo config with small(out, **over); asserts it succeeded."""
    res = cli("train", DEMO, "--set", *small(out, **over))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def config(out, **over) -> dict:
    return load_recipe(DEMO, small(out, **over))


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def assert_peft_reproduces(run_dir, tol: float | None = None) -> None:
    """peft on ``run_dir/base_model`` + ``run_dir/adapter`` gives our loader's logits, and
    the adapter really changed the model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import dist_adapters as da
    from helpers import LOGITS_TOL, input_ids

    base = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "base_model")).eval()
    with torch.no_grad():
        base_logits = base(input_ids=input_ids()).logits
        theirs = PeftModel.from_pretrained(base, os.path.join(run_dir, "adapter")).eval()
        ours = da.load_adapter(AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "base_model")),
                               os.path.join(run_dir, "adapter")).eval()
        diff = (theirs(input_ids=input_ids()).logits - ours(input_ids=input_ids()).logits).abs().max()
        assert diff <= (tol or LOGITS_TOL), diff
        assert (ours(input_ids=input_ids()).logits - base_logits).abs().max() > 1e-3
    assert_auto_peft_reproduces(run_dir, tol)


def assert_auto_peft_reproduces(run_dir, tol: float | None = None) -> None:
    """peft's ``AutoPeftModelForCausalLM.from_pretrained(run_dir/adapter)`` alone (it finds the base
    from the config, and imports the class that ``auto_mapping`` names) gives our loader's logits:
    issue 17, rule 2, for the adapter of every strategy."""
    import json

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    import dist_adapters as da
    from helpers import LOGITS_TOL, input_ids

    adapter = os.path.join(run_dir, "adapter")
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as fh:
        written = json.load(fh)
    mapping = written.get("auto_mapping") or {}
    assert not mapping.get("base_model_class", "").startswith("FSDP"), mapping
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    ours = da.load_adapter(AutoModelForCausalLM.from_pretrained(written["base_model_name_or_path"]), adapter).eval()
    with torch.no_grad():
        diff = (loaded(input_ids=input_ids()).logits - ours(input_ids=input_ids()).logits).abs().max()
        assert diff <= (tol or LOGITS_TOL), diff


def max_adapter_diff(a, b) -> float:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert sorted(ta) == sorted(tb)
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


# Plain SGD (no momentum), no clipping: the adapter after a step moves by lr x gradient, so a wrong
# gradient scale shows in the adapter itself (AdamW is invariant to it, clipping hides it).
SGD = {"train.optimizer": "sgd", "train.max_grad_norm": "null", "train.lr": 0.1}
# Adapter tolerances of the equivalence tests (tests/equivalence.py) after 4 steps, data-parallel
# engines (tensor parallel: test_tp.RECIPE_TOL). AdamW at lr 1e-2 turns ~1e-7 gradient rounding
# into measured 1.2e-6 to 4.8e-6 (ddp, fsdp1/2, zero1-3, QLoRA, LoftQ); plain SGD at lr 0.1 keeps it
# at measured 4.5e-8 to 6e-8, where a 2x gradient moves the adapter by 4e-2.
ADAMW_TOL = 5e-5
SGD_TOL = 5e-7


def torchrun_script(script: str, args: list[str], nproc: int = 2, timeout: int = 300,
                    env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` of one of tests/dist/*.py (e.g. the recipe with a fault or probe)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "tests", "dist", script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def probed_run(out, nproc: int, **over) -> dict:
    """The recipe on ``nproc`` ranks under tests/dist/recipe_probe.py; returns what it observed."""
    result = os.path.join(str(out) + ".probe.json")
    res = torchrun_script("recipe_probe.py", [result, DEMO, "--set", *small(out, **{"launch.nproc_per_node": nproc,
                                                                                    **over})], nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    with open(result, encoding="utf-8") as fh:
        return json.load(fh)
