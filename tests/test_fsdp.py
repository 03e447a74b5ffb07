"""FSDP1 / FSDP2 under real torchrun (2 CPU ranks, gloo): recipe runs equal the single-process
adapter, resharded resume, merge / unmerge / collective save and load under each engine."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

import dist_adapters as da
from helpers import input_ids, randomize_trainable, tiny_llama
from recipe_helpers import DEMO, ROOT, assert_peft_reproduces, cli, max_adapter_diff, small

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    res = cli("train", DEMO, "--set", *small(out, **{"parallel.strategy": "fsdp2", "launch.nproc_per_node": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("strategy, extra", [
    ("fsdp1", {"parallel.use_orig_params": "false"}),
    ("fsdp1", {"parallel.use_orig_params": "true", "parallel.activation_checkpointing": "true"}),
    ("fsdp2", {}),
], ids=["fsdp1-flat", "fsdp1-orig-params-checkpointing", "fsdp2"])
def test_recipe_under_fsdp_equals_single_process(single_run, fsdp2_run, tmp_path, strategy, extra):
    if strategy == "fsdp2" and not extra:
        out = fsdp2_run
    else:
        out = tmp_path / "run"
        res = cli("train", DEMO, "--set", *small(out, **{"parallel.strategy": strategy,
                                                         "launch.nproc_per_node": 2, **extra}))
        assert res.returncode == 0, res.stderr[-3000:]
    diff = max_adapter_diff(single_run, out)
    print(f"max |adapter diff| {strategy} {extra} @2 vs none @1: {diff:.2e}")
    assert diff <= 1e-4
    keys = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert keys["trainable_token_indices"] == [256, 257, 259]


def test_fsdp2_checkpoint_resumes_at_another_world_size(fsdp2_run, tmp_path):
    # 2 ranks -> 1 rank
    res = cli("train", DEMO, "--set", *small(tmp_path / "r21", **{
        "parallel.strategy": "fsdp2", "launch.nproc_per_node": 1,
        "train.resume_from": str(fsdp2_run / "checkpoints" / "step_2")}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(fsdp2_run / "checkpoints" / "step_2" / "dcp" / ".metadata")
    # 1 rank -> 2 ranks
    res = cli("train", DEMO, "--set", *small(tmp_path / "one", **{
        "parallel.strategy": "fsdp2", "launch.nproc_per_node": 1, "train.steps": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli("train", DEMO, "--set", *small(tmp_path / "r12", **{
        "parallel.strategy": "fsdp2", "launch.nproc_per_node": 2,
        "train.resume_from": str(tmp_path / "one" / "checkpoints" / "step_2")}))
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("r21", "r12"):
        diff = max_adapter_diff(fsdp2_run, tmp_path / name)
        print(f"max |adapter diff| resumed {name} vs uninterrupted fsdp2@2: {diff:.2e}")
        assert diff <= 1e-4


def test_fsdp2_bf16_base_with_fp32_adapters(tmp_path):
    res = cli("train", DEMO, "--set", *small(tmp_path, **{"parallel.strategy": "fsdp2", "launch.nproc_per_node": 2,
                                                          "model.dtype": "bfloat16", "train.steps": 6}))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1", "fsdp1_orig"])
def test_merge_save_load_under_fsdp(engine, tmp_path):
    result = tmp_path / "result.json"
    res = subprocess.run([*TORCHRUN, "tests/dist/fsdp_ops.py", engine, str(tmp_path), str(result)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(result.read_text())
    print(engine, got)
    assert got["sharded_vs_plain"] <= 1e-5
    assert got["merged_vs_plain"] <= 1e-5
    assert got["unmerged_vs_plain"] <= 1e-5
    assert got.get("unmerged_weight_diff", 0.0) <= 1e-6
    assert got["loaded_vs_plain"] <= 1e-5
    assert got["saved_files"] == ["adapter_config.json", "adapter_model.safetensors"] and got["tiny_saved"]
    # the adapter written by the sharded model loads in peft with the plain model's logits
    plain = tiny_llama(tie=True)
    da.inject(plain, da.LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[3, 5, 100]))
    randomize_trainable(plain)
    theirs = PeftModel.from_pretrained(tiny_llama(tie=True), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        diff = (theirs(input_ids=input_ids()).logits - plain.eval()(input_ids=input_ids()).logits).abs().max()
    assert diff <= 1e-5


def test_hf_trainer_with_accelerate_fsdp_config(tmp_path):
    """transformers' Trainer trains our injected model under configs/accelerate_fsdp.yaml.
    accelerate enables FSDP only on accelerator devices: on CPU it runs DDP (asserted as such),
    on CUDA the parameters must come out FSDP-sharded."""
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          "configs/accelerate_fsdp.yaml", "examples/hf_trainer.py", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cuda = torch.cuda.is_available()
    assert f"world size 2, accelerate distributed type {'FSDP' if cuda else 'MULTI_CPU'}, " \
           f"parameters sharded: {cuda}" in res.stdout, res.stdout[-2000:]
    assert_peft_reproduces(tmp_path)


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_fsdp_mixed_precision_bf16_compute(tmp_path, strategy):
    """parallel.mixed_precision: bfloat16 computes and reduces in bf16 over fp32 weights; the
    adapter still trains and is saved in fp32."""
    res = cli("train", DEMO, "--set", *small(tmp_path, **{"parallel.strategy": strategy, "launch.nproc_per_node": 2,
                                                          "parallel.mixed_precision": "bfloat16", "train.steps": 6}))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}
