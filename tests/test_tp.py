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
from helpers import LOGITS_TOL, WEIGHTS_TOL, input_ids
from equivalence import assert_equivalent
from recipe_helpers import (ROOT, SGD, SGD_TOL, adapter_tensors, assert_auto_peft_reproduces, assert_peft_reproduces,
                            max_adapter_diff, train_run)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Adam divides by sqrt(v): rounding differences of ~1e-7 in the gradients of a tensor-parallel
# all-reduce become up to ~1e-4 in parameters after 4 steps at lr 1e-2, where a gradient element
# is near zero and its update near lr in size. Measured on the prompt/completion data (issue 20,
# loss on completions only): 1.6e-6 (dp=2) to 8.5e-5 (tp, fsdp2_tp, the 2 x 2 mesh); on the
# earlier all-token text data 3.7e-6 to 1.4e-5. The step-1 loss and gradient norm are equal (0.0)
# and the SGD runs stay at 7.5e-8 (recipe_helpers.SGD_TOL 5e-7): those are the sharp checks.
RECIPE_TOL = 5e-4
RESUME_TOL = 3e-6  # measured 0.0 at the same world size, 2.8e-7 from tp 2 to tp 1


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("tp"), **{"parallel.strategy": "tp", "parallel.tp_size": 2,
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
        assert r[f"{tag}_logits"] <= LOGITS_TOL  # measured 1.2e-7 to 1.9e-7
        assert r[f"{tag}_grad_keys_equal"]
        assert r[f"{tag}_grads"] <= 5e-7  # measured 3.4e-8 to 5.2e-8
        assert r[f"{tag}_grad_norm"] <= 6e-7  # measured 6e-8
        # merge wrote W + scaling * B @ A (and the token rows) into the sharded weights: a merge
        # that did nothing leaves the weights merge_delta away
        assert r[f"{tag}_merged_flags"] == ["['default']"] and r[f"{tag}_unmerged_flags"] == ["[]"]
        assert r[f"{tag}_merged_keys_equal"] and r[f"{tag}_merge_delta"] > 1e-2
        assert r[f"{tag}_merged_weights"] <= WEIGHTS_TOL
        assert r[f"{tag}_merged"] <= LOGITS_TOL  # measured 1.3e-7 to 1.8e-7
        assert r[f"{tag}_unmerged"] <= LOGITS_TOL  # measured 1e-7 to 1.5e-7
        assert r[f"{tag}_unmerged_weights"] <= WEIGHTS_TOL  # measured 7.5e-9
        assert r[f"{tag}_loaded"] <= LOGITS_TOL  # measured 1.2e-7 to 1.5e-7
        assert r[f"{tag}_state_dict"] == 0.0 and r[f"{tag}_state_dict_keys"]  # gathered values, no arithmetic
    assert r["tie_kept"]
    # DoRA: the magnitude follows the output rows; one process's logits and gradients (relative),
    # merge / unmerge (a no-op merge leaves the base's logits, 0.36 away), full peft tensors
    assert r["dora_magnitude_placements"] == ["(Shard(dim=0),)", "(Replicate(),)"]
    assert r["dora_logits"] <= LOGITS_TOL  # measured 8.9e-8
    assert r["dora_grad_keys_equal"] and r["dora_grads"] <= 1e-5  # measured 8.7e-7
    assert r["dora_merged"] <= LOGITS_TOL and r["dora_unmerged"] <= LOGITS_TOL  # measured 1e-7
    assert r["dora_merge_moves"] > 0.1
    assert r["dora_state_dict"] == 0.0 and r["dora_state_dict_keys"]
    # a model transformers sharded itself (DistributedConfig(tp_size=2)), our adapter adopted and
    # loaded into it: one process's logits and gradients, merge / unmerge, full peft tensors
    assert r["hf_q_local_shape"] == [16, 32]
    assert r["hf_logits"] <= LOGITS_TOL  # measured 1.2e-7
    assert r["hf_grad_keys_equal"] and r["hf_grads"] <= 5e-7  # measured 4.5e-8
    assert r["hf_merged"] <= LOGITS_TOL and r["hf_unmerged"] <= LOGITS_TOL  # measured 1.2e-7 to 1.3e-7
    assert r["hf_state_dict"] == 0.0 and r["hf_state_dict_keys"]  # gathered values, no arithmetic
    assert r["clip_before"] > 0.5 and abs(r["clip_after"] - 0.5) <= 2e-6  # measured 1.2e-7
    # parallelize(plan=...): the caller's plan decides what is sharded (here the MLP only)
    assert r["plan_placements"] == ["(Shard(dim=0),)", "(Shard(dim=1),)", "(Shard(dim=0),)", "(Replicate(),)"]
    assert r["plan_unsharded_is_plain"] and r["plan_logits"] <= LOGITS_TOL  # measured 8.9e-8
    assert "lm_head is in modules_to_save" in r["refused_modules_to_save"]
    assert "bias='none', no modules_to_save" in r["refused_bias"]


def test_recipe_tp_equals_single_process(single_run, tp_run):
    assert_equivalent(tp_run, single_run, RECIPE_TOL, "tp@2 vs none@1, AdamW")


def test_recipe_hf_tp_equals_single_process(single_run, tmp_path):
    """transformers shards the model itself (``DistributedConfig(tp_size=2)``, Llama's own
    ``base_model_tp_plan``) and the adapters, trainable tokens included, follow its placements
    (``tensor.adopt``): the same adapter as one process (measured 1.4e-5), peft reproduces it,
    and its DCP checkpoint resumes under our own ``tp`` (the same placements and names)."""
    out = train_run(tmp_path / "run", **{"parallel.strategy": "hf_tp", "parallel.tp_size": 2,
                                      "launch.nproc_per_node": 2})
    assert_equivalent(out, single_run, RECIPE_TOL, "hf_tp@2 vs none@1, AdamW")
    assert_peft_reproduces(out)
    resumed = train_run(tmp_path / "resumed", **{"parallel.strategy": "tp", "parallel.tp_size": 2,
                                              "launch.nproc_per_node": 2,
                                              "train.resume_from": str(out / "checkpoints" / "step_2")})
    diff = max_adapter_diff(out, resumed)
    print(f"max |adapter diff| hf_tp step 2 resumed under tp vs uninterrupted: {diff:.2e}")
    assert diff <= RESUME_TOL


@pytest.mark.parametrize("tp_size", [2, 1], ids=["mesh-dp1-tp2", "mesh-dp2-tp1"])
def test_recipe_fsdp2_tp_equals_single_process(single_run, tmp_path, tp_size):
    out = train_run(tmp_path / "run", **{"parallel.strategy": "fsdp2_tp", "parallel.tp_size": tp_size,
                                      "launch.nproc_per_node": 2})
    assert_equivalent(out, single_run, RECIPE_TOL, f"fsdp2_tp (dp={2 // tp_size}, tp={tp_size}) vs none@1, AdamW")


@pytest.mark.parametrize("strategy", ["tp", "fsdp2_tp"])
def test_recipe_tp_with_sgd_equals_single_process(single_sgd_run, tmp_path, strategy):
    """Plain SGD: a tensor-parallel rank that counted the shared samples twice (a dropped
    "/ copies") would move the adapter half as far."""
    out = train_run(tmp_path / "run", **SGD, **{"parallel.strategy": strategy, "parallel.tp_size": 2,
                                             "launch.nproc_per_node": 2})
    assert_equivalent(out, single_sgd_run, SGD_TOL, f"{strategy} (tp=2) vs none@1, SGD")


@pytest.fixture(scope="module")
def mesh_2x2_run(tmp_path_factory):
    # 4 ranks on 2 cores (slow, but the only way to get a mesh with both dimensions > 1 here)
    return train_run(tmp_path_factory.mktemp("mesh2x2"), **{"parallel.strategy": "fsdp2_tp", "parallel.tp_size": 2,
                                                        "launch.nproc_per_node": 4, "train.micro_batch_size": 2})


def test_recipe_fsdp2_tp_on_a_2x2_mesh_equals_single_process(single_run, mesh_2x2_run):
    assert_equivalent(mesh_2x2_run, single_run, RECIPE_TOL, "fsdp2_tp (dp=2, tp=2, 4 ranks) vs none@1, AdamW")
    assert_auto_peft_reproduces(mesh_2x2_run)


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
    assert diff <= 1e-3  # two adapters RECIPE_TOL apart; measured 1.0e-4 (6.2e-6 on the earlier text data)


def test_trainable_tokens_under_tp_match_single_process(single_run, tp_run):
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    one, two = adapter_tensors(single_run)[key], adapter_tensors(tp_run)[key]
    assert one.shape == two.shape == (3, 128)
    base = AutoModelForCausalLM.from_pretrained(single_run / "base_model").model.embed_tokens.weight
    assert (one - base[[256, 257, 259]]).abs().max() > 1e-3  # the rows were trained
    diff = (one - two).abs().max().item()
    print(f"trainable token rows, tp@2 vs none@1: {diff:.2e}")
    assert diff <= 1e-5  # AdamW, as RECIPE_TOL; measured 1.1e-6 (7.5e-8 on the earlier text data)


@pytest.mark.parametrize("case", ["tp2-to-tp2", "tp2-to-tp1", "2x2-to-dp1xtp2"])
def test_tp_checkpoint_resumes(tp_run, mesh_2x2_run, tmp_path, case):
    """The DCP checkpoint resumes at the same world size and at another one (tp 2 -> tp 1 on one
    rank; a 2 x 2 mesh -> 1 x 2)."""
    run, nproc, over = {"tp2-to-tp2": (tp_run, 2, {"parallel.strategy": "tp", "parallel.tp_size": 2}),
                        "tp2-to-tp1": (tp_run, 1, {"parallel.strategy": "tp", "parallel.tp_size": 1}),
                        "2x2-to-dp1xtp2": (mesh_2x2_run, 2, {"parallel.strategy": "fsdp2_tp", "parallel.tp_size": 2,
                                                             "train.micro_batch_size": 2})}[case]
    out = train_run(tmp_path / "resumed", **over, **{"launch.nproc_per_node": nproc,
                                                  "train.resume_from": str(run / "checkpoints" / "step_2")})
    diff = max_adapter_diff(run, out)
    print(f"max |adapter diff| {case} resumed at step 2 vs uninterrupted: {diff:.2e}")
    assert diff <= RESUME_TOL
