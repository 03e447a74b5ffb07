"""DTensor tensor parallel (``parallel/tensor.py``) under real torchrun (2 CPU ranks, gloo):
layer math against one process, recipe strategies ``tp`` and ``fsdp2_tp`` against the
single-process adapter, peft loading a TP-trained adapter, trainable tokens under tp, resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import dist_adapters as da
from helpers import input_ids
from recipe_helpers import DEMO, ROOT, adapter_tensors, assert_peft_reproduces, cli, max_adapter_diff, small

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Adam divides by sqrt(v): rounding differences of ~1e-7 in the gradients of a tensor-parallel
# all-reduce become ~1e-5 in parameters after a few steps (measured: see the printed figures).
RECIPE_TOL = 2e-4


def _train(out, **over):
    res = cli("train", DEMO, "--set", *small(out, **over))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("tp"), **{"parallel.strategy": "tp", "parallel.tp_size": 2,
                                                    "launch.nproc_per_node": 2})


def test_tp_layers_match_one_process(tmp_path):
    result = tmp_path / "result.json"
    res = subprocess.run([*TORCHRUN, os.path.join(ROOT, "tests", "dist", "tp_ops.py"), str(tmp_path), str(result)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(result.read_text())
    print(json.dumps({k: v for k, v in r.items() if not k.endswith("placements")}, indent=1))
    for tag in ("untied", "tied"):
        # the base is really sharded and the factors carry the placements of the module docstring
        assert r[f"{tag}_q_local_shape"] == [16, 32]
        p = r[f"{tag}_placements"]
        assert p["model.layers.0.self_attn.q_proj.lora_B.default.weight"] == "(Shard(dim=0),)"
        assert p["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == "(Replicate(),)"
        assert p["model.layers.0.mlp.down_proj.lora_A.default.weight"] == "(Shard(dim=1),)"
        assert p["model.layers.0.mlp.down_proj.lora_B.default.weight"] == "(Replicate(),)"
        assert p["model.embed_tokens.trainable_tokens_delta.default.weight"] == "(Replicate(),)"
        assert r[f"{tag}_logits"] <= 1e-5
        assert r[f"{tag}_grad_keys_equal"]
        assert r[f"{tag}_grads"] <= 1e-5
        assert r[f"{tag}_grad_norm"] <= 1e-5
        assert r[f"{tag}_merged"] <= 1e-4
        assert r[f"{tag}_unmerged"] <= 1e-5
        assert r[f"{tag}_unmerged_weights"] <= 1e-6
        assert r[f"{tag}_loaded"] <= 1e-5
        assert r[f"{tag}_state_dict"] <= 1e-6 and r[f"{tag}_state_dict_keys"]
    assert r["tie_kept"]
    assert r["clip_before"] > 0.5 and abs(r["clip_after"] - 0.5) <= 1e-4


def test_recipe_tp_equals_single_process(single_run, tp_run):
    diff = max_adapter_diff(single_run, tp_run)
    print(f"max |adapter diff| tp@2 vs none@1: {diff:.2e}")
    assert diff <= RECIPE_TOL


@pytest.mark.parametrize("tp_size", [2, 1], ids=["mesh-dp1-tp2", "mesh-dp2-tp1"])
def test_recipe_fsdp2_tp_equals_single_process(single_run, tmp_path, tp_size):
    out = _train(tmp_path / "run", **{"parallel.strategy": "fsdp2_tp", "parallel.tp_size": tp_size,
                                      "launch.nproc_per_node": 2})
    diff = max_adapter_diff(single_run, out)
    print(f"max |adapter diff| fsdp2_tp (dp={2 // tp_size}, tp={tp_size}) vs none@1: {diff:.2e}")
    assert diff <= RECIPE_TOL


def test_recipe_fsdp2_tp_on_a_2x2_mesh_equals_single_process(single_run, tmp_path):
    # 4 ranks on 2 cores (slow, but the only way to get a mesh with both dimensions > 1 here)
    out = _train(tmp_path / "run", **{"parallel.strategy": "fsdp2_tp", "parallel.tp_size": 2,
                                      "launch.nproc_per_node": 4, "train.micro_batch_size": 2})
    diff = max_adapter_diff(single_run, out)
    print(f"max |adapter diff| fsdp2_tp (dp=2, tp=2, 4 ranks) vs none@1: {diff:.2e}")
    assert diff <= RECIPE_TOL


def test_tp_adapter_loads_in_peft_with_single_process_logits(single_run, tp_run):
    assert_peft_reproduces(tp_run)
    ids = input_ids()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tp_run / "base_model"),
                                           str(tp_run / "adapter")).eval()(input_ids=ids).logits
        ours = da.load_adapter(AutoModelForCausalLM.from_pretrained(single_run / "base_model"),
                               str(single_run / "adapter")).eval()(input_ids=ids).logits
    diff = (theirs - ours).abs().max().item()
    print(f"peft on the tp adapter vs the single-process model: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4


def test_trainable_tokens_under_tp_match_single_process(single_run, tp_run):
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    one, two = adapter_tensors(single_run)[key], adapter_tensors(tp_run)[key]
    assert one.shape == two.shape == (3, 128)
    base = AutoModelForCausalLM.from_pretrained(single_run / "base_model").model.embed_tokens.weight
    assert (one - base[[256, 257, 259]]).abs().max() > 1e-3  # the rows were trained
    diff = (one - two).abs().max().item()
    print(f"trainable token rows, tp@2 vs none@1: {diff:.2e}")
    assert diff <= 1e-4


def test_tp_checkpoint_resumes(tp_run, tmp_path):
    out = _train(tmp_path / "resumed", **{"parallel.strategy": "tp", "parallel.tp_size": 2, "launch.nproc_per_node": 2,
                                          "train.resume_from": str(tp_run / "checkpoints" / "step_2")})
    diff = max_adapter_diff(tp_run, out)
    print(f"max |adapter diff| tp resumed at step 2 vs uninterrupted: {diff:.2e}")
    assert diff <= 1e-6
