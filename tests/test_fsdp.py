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
from helpers import LOGITS_TOL, WEIGHTS_TOL, input_ids, randomize_trainable, tiny_llama
from equivalence import assert_equivalent
from recipe_helpers import (ADAMW_TOL, ROOT, SGD, SGD_TOL, assert_auto_peft_reproduces, assert_peft_reproduces,
                            max_adapter_diff, probed_run, train_run)

RESUME_TOL = 3e-6  # measured 0.0 (2 -> 1 and 1 -> 2 ranks); 2.8e-7 under tp (test_tp.py)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(out, strategy, nproc=2, **over):
    return train_run(out, **{"parallel.strategy": strategy, "launch.nproc_per_node": nproc, **over})


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """fsdp1 (flat parameters) and fsdp2 on 2 ranks, the demo config for 4 steps (AdamW)."""
    return {s: _run(tmp_path_factory.mktemp(s), s) for s in ("fsdp1", "fsdp2")}


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_recipe_under_fsdp_equals_single_process(single_run, fsdp_runs, strategy):
    out = fsdp_runs[strategy]
    assert_equivalent(out, single_run, ADAMW_TOL, f"{strategy}@2 vs none@1, AdamW")
    keys = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert keys["trainable_token_indices"] == [256, 257, 259]
    assert_auto_peft_reproduces(out)


@pytest.mark.parametrize("strategy, extra", [("fsdp1", {"parallel.use_orig_params": "true"}), ("fsdp2", {})],
                         ids=["fsdp1-orig-params", "fsdp2"])
def test_recipe_under_fsdp_with_sgd_equals_single_process(single_sgd_run, tmp_path, strategy, extra):
    out = _run(tmp_path / "run", strategy, **SGD, **extra)
    assert_equivalent(out, single_sgd_run, SGD_TOL, f"{strategy} {extra}@2 vs none@1, SGD")


@pytest.mark.parametrize("strategy, extra", [
    ("fsdp1", {"parallel.use_orig_params": "true"}), ("fsdp2", {})], ids=["fsdp1-orig-params", "fsdp2"])
def test_activation_checkpointing_really_recomputes_each_block(single_run, tmp_path, strategy, extra):
    """parallel.activation_checkpointing: every block runs forward twice per micro step (once more
    in backward), and the run still trains the single-process adapter."""
    probe = probed_run(tmp_path / "run", 2, **{"parallel.strategy": strategy,
                                               "parallel.activation_checkpointing": "true", **extra})
    micro_steps = 4  # 4 steps x (8 samples / 2 ranks / micro batch 4)
    assert probe["block_calls"] and set(probe["block_calls"].values()) == {2 * micro_steps}, probe
    assert probe["training"] == [True] and probe["base_dtypes"] == [["torch.float32", "torch.float32"]], probe
    assert_equivalent(tmp_path / "run", single_run, ADAMW_TOL, f"{strategy} {extra} + checkpointing@2 vs none@1")
    assert_auto_peft_reproduces(tmp_path / "run")


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_checkpoint_resumes_at_another_world_size(fsdp_runs, tmp_path, strategy):
    """A DCP checkpoint of 2 ranks resumes on 1 (and, for fsdp2, one of 1 rank on 2)."""
    run = fsdp_runs[strategy]
    assert os.path.isfile(run / "checkpoints" / "step_2" / "dcp" / ".metadata")
    resumed = {"2->1": _run(tmp_path / "r21", strategy, nproc=1,
                            **{"train.resume_from": str(run / "checkpoints" / "step_2")})}
    if strategy == "fsdp2":
        _run(tmp_path / "one", strategy, nproc=1, **{"train.steps": 2})
        resumed["1->2"] = _run(tmp_path / "r12", strategy, **{
            "train.resume_from": str(tmp_path / "one" / "checkpoints" / "step_2")})
    for name, out in resumed.items():
        diff = max_adapter_diff(run, out)
        print(f"max |adapter diff| {strategy} resumed {name} vs uninterrupted @2: {diff:.2e}")
        assert diff <= RESUME_TOL


def test_fsdp2_bf16_base_with_fp32_adapters(tmp_path):
    """model.dtype: bfloat16 under fsdp2: the base really runs in bf16 (seen inside its forward),
    the adapter trains and is saved in fp32."""
    probe = probed_run(tmp_path / "run", 2, **{"parallel.strategy": "fsdp2", "model.dtype": "bfloat16",
                                               "train.steps": 6})
    assert probe["base_dtypes"] == [["torch.bfloat16", "torch.bfloat16"]], probe
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    from dist_adapters.verify_cmd import verify

    print(verify(str(tmp_path / "run")))  # the live logits were bf16: verify's bf16 tolerance applies


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1", "fsdp1_orig"])
def test_merge_save_load_under_fsdp(engine, tmp_path):
    result = tmp_path / "result.json"
    res = subprocess.run([*TORCHRUN, "tests/dist/fsdp_ops.py", engine, str(tmp_path), str(result)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(result.read_text())
    print(engine, got)
    assert got["sharded_vs_plain"] <= LOGITS_TOL  # measured 0.0
    # the fused LoRA Linear: 3 blocks x 7 linears in one process; under FSDP2 too, with the plain
    # gradients; under FSDP1 (every leaf its own unit) never
    assert got["fused_calls_plain"] == 21
    if engine == "fsdp2":
        assert got["fused_calls_sharded"] == 21
        assert got["grad_scale"] > 1e-3 and got["fused_grads_vs_plain"] <= WEIGHTS_TOL  # measured 0.0
    else:
        assert got["fused_calls_sharded"] == 0
    # merge wrote W + scaling * B @ A (and the token rows) into the sharded base weights; the
    # delta is far above the tolerance, so a merge that did nothing fails
    assert got["merged_flags"] == ["['default']"] and got["unmerged_flags"] == ["[]"]
    assert got["merge_delta"] > 1e-2 and got["merged_weights_vs_expected"] <= WEIGHTS_TOL  # measured 0.0
    assert got["merged_vs_plain"] <= LOGITS_TOL  # measured 1.8e-7
    assert got["unmerged_vs_plain"] <= LOGITS_TOL  # measured 1.8e-7
    assert got["unmerged_weight_diff"] <= WEIGHTS_TOL  # measured 0 to 7.5e-9
    assert got["loaded_vs_plain"] <= LOGITS_TOL  # measured 0.0
    assert got["saved_files"] == ["adapter_config.json", "adapter_model.safetensors", "verification.json"] and got["tiny_saved"]
    # DoRA under the engine: logits, merged ((m/n) * (W + s B A) written into the shards) and unmerged
    assert got["dora_logits"] <= LOGITS_TOL and got["dora_unmerged"] <= LOGITS_TOL
    assert got["dora_merged"] <= 1e-5 and got["dora_merge_moves"] > 1e-2
    if engine != "fsdp2":
        assert got["adapter_leaf_units"] == 3 * 7 * 2 + 1  # LoRA factors of 3 blocks x 7 linears, token rows
    if engine == "fsdp1_orig":
        assert "bias='all' under FSDP1: the biases live in frozen flat parameters" in got["refused_bias"]
    # the adapter written by the sharded model loads in peft with the plain model's logits
    plain = tiny_llama(tie=True)
    da.inject(plain, da.LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[3, 5, 100]))
    randomize_trainable(plain)
    theirs = PeftModel.from_pretrained(tiny_llama(tie=True), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        diff = (theirs(input_ids=input_ids()).logits - plain.eval()(input_ids=input_ids()).logits).abs().max()
    assert diff <= LOGITS_TOL  # measured 1.2e-7


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
    for step in (5, 10):  # AdapterCheckpointCallback: a PEFT adapter in every Trainer checkpoint
        assert (tmp_path / f"checkpoint-{step}" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_fsdp_mixed_precision_bf16_compute(tmp_path, strategy):
    """parallel.mixed_precision: bfloat16 computes in bf16 over fp32 shards (seen inside the base
    layer's forward); the adapter still trains and is saved in fp32."""
    probe = probed_run(tmp_path / "run", 2, **{"parallel.strategy": strategy, "parallel.mixed_precision": "bfloat16",
                                               "train.steps": 6})
    assert probe["base_dtypes"] == [["torch.bfloat16", "torch.bfloat16"]], probe
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    from dist_adapters.verify_cmd import verify

    print(verify(str(tmp_path / "run")))  # the live logits were bf16: verify's bf16 tolerance applies
