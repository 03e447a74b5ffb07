"""DeepSpeed ZeRO-1/2/3 under real torchrun (2 CPU ranks, gloo, DS_ACCELERATOR=cpu): recipe runs
equal the single-process adapter, resume at another world size, and injection / save / merge on
a model built partitioned under ZeRO-3."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import LOGITS_TOL, WEIGHTS_TOL, input_ids, tiny_llama
from equivalence import assert_equivalent
from recipe_helpers import (ADAMW_TOL, DEMO, ROOT, SGD, SGD_TOL, assert_auto_peft_reproduces, assert_peft_reproduces,
                            cli, max_adapter_diff, small)

RESUME_TOL = 3e-6  # measured 0.0 (2 -> 1 and 2 -> 2 ranks); 2.8e-7 under tp (test_tp.py)

_RUNS: dict = {}


def zero_run(stage: str, tmp_path_factory):
    if stage not in _RUNS:
        out = tmp_path_factory.mktemp(stage)
        res = cli("train", DEMO, "--set", *small(out, **{"parallel.strategy": stage, "launch.nproc_per_node": 2}))
        assert res.returncode == 0, res.stderr[-3000:]
        _RUNS[stage] = out
    return _RUNS[stage]


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_recipe_under_zero_equals_single_process(single_run, tmp_path_factory, stage):
    out = zero_run(stage, tmp_path_factory)
    assert_equivalent(out, single_run, ADAMW_TOL, f"{stage}@2 vs none@1 (LoRA + trainable tokens), AdamW")
    ckpt = out / "checkpoints" / "step_2"
    assert (ckpt / "deepspeed" / "latest").read_text().strip() == "state"
    assert (ckpt / "adapter_optimizer.pt").is_file()
    assert_auto_peft_reproduces(out)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_recipe_under_zero_with_sgd_equals_single_process(single_sgd_run, tmp_path, stage):
    res = cli("train", DEMO, "--set", *small(tmp_path, **SGD, **{"parallel.strategy": stage,
                                                                 "launch.nproc_per_node": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_equivalent(tmp_path, single_sgd_run, SGD_TOL, f"{stage}@2 vs none@1, SGD")


@pytest.mark.parametrize("stage, nproc", [("zero2", 1), ("zero3", 1), ("zero3", 2)],
                         ids=["zero2-2to1", "zero3-2to1", "zero3-2to2"])
def test_zero_checkpoint_resumes(tmp_path_factory, tmp_path, stage, nproc):
    """At another world size the adapter's full Adam moments (adapter_optimizer.pt) restore the
    optimizer; at the same world size DeepSpeed's own load_checkpoint does: that file is removed
    from the copy resumed here (and from the copy's manifest), so only DeepSpeed's checkpoint can
    supply the moments."""
    out = zero_run(stage, tmp_path_factory)
    ckpt = out / "checkpoints" / "step_2"
    if nproc == 2:
        shutil.copytree(ckpt, tmp_path / "step_2")
        ckpt = tmp_path / "step_2"
        (ckpt / "adapter_optimizer.pt").unlink()
        manifest = json.loads((ckpt / "manifest.json").read_text())  # the copy's own, without that file
        del manifest["files"]["adapter_optimizer.pt"]
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    res = cli("train", DEMO, "--set", *small(tmp_path / "run", **{
        "parallel.strategy": stage, "launch.nproc_per_node": nproc, "train.resume_from": str(ckpt)}))
    assert res.returncode == 0, res.stderr[-3000:]
    diff = max_adapter_diff(out, tmp_path / "run")
    print(f"max |adapter diff| {stage} resumed 2 -> {nproc} rank(s) vs uninterrupted: {diff:.2e}")
    assert diff <= RESUME_TOL


def test_zero3_partitioned_model_inject_save_merge(tmp_path):
    tiny_llama(tie=True).save_pretrained(tmp_path / "base_model")
    result = tmp_path / "result.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "tests/dist/zero3_ops.py", str(tmp_path), str(result)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(result.read_text())
    print(got)
    assert got["partitioned_shape"] == [0] and got["ds_shape"] == [32, 32]  # really partitioned
    assert got["lora_A_shape"] == [4, 32]  # injected with shapes from ds_shape
    assert got["token_rows_init_diff"] == 0.0  # token rows copied through the ZeRO-3 gather (vs the file)
    assert got["fused_calls"] == 0  # ZeRO-3's hooks on the leaves keep the layers on the leaf calls
    # measured: merged weights 0.0 from the expected, logits 2.4e-7, unmerged weights 1.5e-8,
    # unmerged logits 1.8e-7 to 2.4e-7, unloaded 1.2e-7 to 1.6e-7
    assert got["merge_changed_weight"] > 1e-3 and got["merged_weight_vs_expected"] <= WEIGHTS_TOL
    assert got["merged_flags"] and got["unmerged_flags"] and got["merged_vs_unmerged"] <= LOGITS_TOL
    assert got["unmerged_weight_diff"] <= WEIGHTS_TOL and got["unmerged_vs_before"] <= LOGITS_TOL
    assert got["halved_differs"] > 1e-3 and got["after_step_vs_loaded"] == 0.0  # fp32 master updated
    assert got["unloaded_vs_before"] <= LOGITS_TOL and not got["unloaded_has_lora"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert all(t.numel() > 0 for t in saved.values())  # no empty placeholders
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base_model"),
                                       str(tmp_path / "adapter")).eval()
    ours = torch.load(tmp_path / "logits_rank0.pt", weights_only=True)
    with torch.no_grad():
        assert (theirs(input_ids=input_ids()).logits - ours).abs().max() <= LOGITS_TOL  # measured 6e-8


def test_hf_trainer_with_accelerate_deepspeed_config(tmp_path):
    """transformers' Trainer trains our injected model under configs/accelerate_deepspeed.yaml
    (ZeRO-3, which accelerate runs on CPU too); the collective save writes full tensors."""
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          "configs/accelerate_deepspeed.yaml", "examples/hf_trainer.py", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2, accelerate distributed type DEEPSPEED, parameters sharded: True" in res.stdout
    assert_peft_reproduces(tmp_path)
    for step in (5, 10):  # AdapterCheckpointCallback: a PEFT adapter in every Trainer checkpoint
        assert (tmp_path / f"checkpoint-{step}" / "adapter" / "adapter_model.safetensors").is_file()


def test_user_deepspeed_config_passes_through(tmp_path):
    from dist_adapters.parallel.deepspeed import zero_config
    from dist_adapters.parallel.engine import EngineConfig

    user = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "steps_per_print": 7}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    config = EngineConfig(micro_batch_size=4, accumulation=3, max_grad_norm=1.0, deepspeed_config=str(path))
    got = zero_config(config, 3, world_size=2)
    assert got["zero_optimization"]["offload_optimizer"] == {"device": "cpu"} and got["steps_per_print"] == 7
    assert (got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"], got["train_batch_size"]) == (4, 3, 24)
    assert got["gradient_clipping"] == 1.0
    # no clipping asked: 0.0 written out, since DeepSpeed's own default would clip at 1.0
    unclipped = zero_config(EngineConfig(micro_batch_size=4, accumulation=1, max_grad_norm=None), 2, 2)
    assert unclipped["gradient_clipping"] == 0.0
    from dist_adapters.parallel.deepspeed import DEFAULT_CONFIGS

    for stage in (1, 2, 3):  # the shipped JSON files are the defaults the recipe uses
        with open(os.path.join(ROOT, "configs", f"zero{stage}.json"), encoding="utf-8") as fh:
            assert json.load(fh) == DEFAULT_CONFIGS[stage]


def test_zero3_recipe_with_a_model_directory_loads_partitioned(tmp_path):
    """model.path under zero3 loads through HfDeepSpeedConfig (zero.Init) and still trains the
    single-process adapter."""
    from dist_adapters.recipe.builtin import builtin_model, builtin_tokenizer

    tok = builtin_tokenizer()
    builtin_model(0, tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    runs = {}
    for strategy, nproc in (("none", 1), ("zero3", 2)):
        runs[strategy] = tmp_path / strategy
        res = cli("train", DEMO, "--set", *small(runs[strategy], **{
            "model.path": str(tmp_path / "model"), "parallel.strategy": strategy, "launch.nproc_per_node": nproc,
            "train.micro_batch_size": 2}))
        assert res.returncode == 0, res.stderr[-3000:]
    assert_equivalent(runs["zero3"], runs["none"], ADAMW_TOL, "zero3@2 from model.path vs none@1")
