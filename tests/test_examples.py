"""The scripts in examples/ run as documented and write adapters peft loads."""

import os
import re
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import dist_adapters as da
from helpers import LOGITS_TOL
from recipe_helpers import ROOT


def _run(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _check_peft_loads(out):
    """peft and our loader give the same logits, and the trained adapter changes the base's."""
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    theirs = PeftModel.from_pretrained(base, str(out / "adapter"))
    ours = da.load_adapter(AutoModelForCausalLM.from_pretrained(out / "base_model"), str(out / "adapter"))
    with torch.no_grad():
        theirs_logits, ours_logits = theirs.eval()(input_ids=ids).logits, ours.eval()(input_ids=ids).logits
    assert (theirs_logits - ours_logits).abs().max() <= LOGITS_TOL  # measured 0.0
    assert (ours_logits - base_logits).abs().max() > 1e-1  # the adapter was trained (quickstart: 1.1)


def _losses(stdout: str) -> list[float]:
    return [float(line.split()[-1]) for line in stdout.splitlines() if line.startswith("step ")]


def test_ddp_raw_loop_under_torchrun(tmp_path):
    res = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "examples/ddp_raw_loop.py", "--out", str(tmp_path), "--steps", "10"])
    assert "world size 2" in res.stdout
    losses = _losses(res.stdout)
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], res.stdout  # steps 1, 5, 10
    _check_peft_loads(tmp_path)


def test_lora_quickstart(tmp_path):
    res = _run(["examples/lora_quickstart.py", "--output-dir", str(tmp_path), "--steps", "10"])
    line = next(x for x in res.stdout.splitlines() if x.startswith("reloaded from disk"))
    reload_diff, merge_diff = (float(x) for x in re.findall(r"\d\.\d+e[-+]\d+", line))
    print(line)
    assert reload_diff <= 1e-6 and merge_diff <= 6e-6  # measured 0.0 (the same ops) and 5.7e-7
    losses = _losses(res.stdout)
    assert len(losses) == 3 and losses[-1] < 0.9 * losses[0], res.stdout  # measured 4.17 -> 3.56 in 10 steps
    _check_peft_loads(tmp_path)


def test_deepspeed_checkpoint_consolidated_after_the_run(tmp_path):
    """A plain ZeRO-3 run saves only DeepSpeed's checkpoint; consolidating it gives an adapter
    that reproduces the trained engine and that peft loads."""
    res = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "examples/deepspeed_consolidate.py", "--out", str(tmp_path), "--steps", "10"], timeout=600)
    losses = _losses(res.stdout)
    assert len(losses) == 10 and losses[-1] < losses[0], res.stdout
    assert "DeepSpeed ZeRO-3, 2 ranks, tag global_step10" in res.stdout
    diff = float(res.stdout.split("max |logits diff| ")[1].split()[0])
    assert diff <= LOGITS_TOL, res.stdout  # measured 0.0
    _check_peft_loads(tmp_path)


def test_trl_sft_example_checkpoints_hold_a_peft_adapter(tmp_path):
    """examples/trl_sft.py as the README runs it, under torchrun on 2 ranks and in one process
    (few steps): every checkpoint-N/adapter is there, and the last one loads in peft."""
    res = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "examples/trl_sft.py",
                "--out", str(tmp_path / "ddp"), "--steps", "4", "--save-steps", "2"])
    assert "checkpoints with a PEFT adapter/: ['checkpoint-2', 'checkpoint-4']" in res.stdout, res.stdout[-2000:]
    res = _run(["examples/trl_sft.py", "--out", str(tmp_path / "one"), "--steps", "2", "--save-steps", "2"])
    assert "checkpoints with a PEFT adapter/: ['checkpoint-2']" in res.stdout, res.stdout[-2000:]
    for run, step in (("ddp", 2), ("ddp", 4), ("one", 2)):
        assert (tmp_path / run / f"checkpoint-{step}" / "adapter" / "adapter_config.json").is_file()
    (tmp_path / "ddp" / "adapter").symlink_to(tmp_path / "ddp" / "checkpoint-4" / "adapter")
    _check_peft_loads(tmp_path / "ddp")
