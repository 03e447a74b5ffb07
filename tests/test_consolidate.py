"""`dist-adapters consolidate` / `inspect` on checkpoints written by plain engines (no
dist_adapters save code involved): DeepSpeed ZeRO-1/2/3 `save_checkpoint`, FSDP2 + `dcp.save`,
accelerate's `save_fsdp_model`; each with our adapters and with peft's. The references are the
engines' own tools (deepspeed's zero_to_fp32, torch's dcp_to_torch_save) and peft loading the
result over the base model. The model has odd sizes (hidden 36, intermediate 45, r 3 / 4), so
ZeRO's partition padding is exercised. Megatron TP shards: tests/test_megatron.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from helpers import input_ids
from recipe_helpers import ROOT, cli

LOGIT_TOL = 3e-6  # peft over the consolidated adapter vs the live engine; measured 1.8e-7 to 3.1e-7

# (kind, adapter, extra args): the fixture runs them all in one torchrun
RUNS = {
    "zero1-ours": ("zero", "ours", ["--stage", "1", "--tokens"]),
    "zero2-ours": ("zero", "ours", ["--stage", "2"]),
    "zero3-ours": ("zero", "ours", ["--stage", "3", "--tokens"]),
    "zero1-peft": ("zero", "peft", ["--stage", "1"]),
    "zero2-peft": ("zero", "peft", ["--stage", "2"]),
    "zero3-peft": ("zero", "peft", ["--stage", "3"]),
    "dcp-ours": ("dcp", "ours", ["--tokens"]),
    "dcp-peft": ("dcp", "peft", []),
    "accelerate-peft": ("accelerate", "peft", []),
    "accelerate-ours": ("accelerate", "ours", []),
    "fsdp1-dcp-peft": ("fsdp1-dcp", "peft", []),
    "fsdp1-ranks-ours": ("fsdp1-ranks", "ours", []),
    "fsdp1-ranks-peft": ("fsdp1-ranks", "peft", []),
    "fsdp1-local-peft": ("fsdp1-local", "peft", []),
    # ~31M frozen parameters, 1 MB adapter: test_consolidation_memory_stays_near_the_adapter_size
    "big-zero3-ours": ("zero", "ours", ["--stage", "3", "--vocab", "32000", "--hidden", "384", "--inter", "1024",
                                        "--layers", "4", "--lora-rank", "16", "--steps", "1"]),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """All RUNS in one torchrun (2 ranks), one job after another: one start-up, one DeepSpeed import."""
    root = tmp_path_factory.mktemp("ckpts")
    argv = []
    for name, (kind, adapter, extra) in RUNS.items():
        argv += ["+"] * bool(argv) + [kind, adapter, str(root / name), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "tests/dist/write_checkpoints.py", *argv], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return {name: root / name for name in RUNS}


def _peft_key(name: str) -> str:
    """zero_to_fp32 / dcp_to_torch_save names -> peft file keys, spelled out independently of
    dist_adapters.checkpoint.keys."""
    name = name.removeprefix("model.base_model.model.").removeprefix("base_model.model.")
    name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    name = name.replace(".trainable_tokens_delta.default.weight", ".token_adapter.trainable_tokens_delta")
    return "base_model.model." + name


def _consolidate(src, out, *extra):
    res = cli("consolidate", str(src), str(out), "--quiet", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(os.path.join(out, "adapter_model.safetensors")), res


def _peft_logits(run_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        got = model(input_ids=input_ids()).logits
    return (got - torch.load(run_dir / "logits.pt", weights_only=True)).abs().max().item()


@pytest.mark.parametrize("name", [n for n in RUNS if n.startswith("zero")])
def test_zero_checkpoint_equals_zero_to_fp32_and_loads_in_peft(ckpts, name, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = ckpts[name]
    got, res = _consolidate(run / "ckpt", tmp_path / "out")
    stage = RUNS[name][2][1]
    assert f"DeepSpeed ZeRO-{stage} (2 ranks, tag global_step2)" in res.stdout
    ref = get_fp32_state_dict_from_zero_checkpoint(str(run / "ckpt"), exclude_frozen_parameters=True)
    ref = {_peft_key(k): v.contiguous() for k, v in ref.items()}
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref), "differs from zero_to_fp32"
    assert any(t.numel() % 2 for t in got.values())  # an odd-sized tensor: ZeRO padded it
    diff = _peft_logits(run, tmp_path / "out")
    print(f"{name}: equal to zero_to_fp32; peft logits vs the engine's {diff:.2e}")
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("name", ["dcp-ours", "dcp-peft", "accelerate-peft", "accelerate-ours", "fsdp1-dcp-peft"])
def test_dcp_checkpoint_equals_dcp_to_torch_save_and_loads_in_peft(ckpts, name, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = ckpts[name]
    src = run / "ckpt"
    got, res = _consolidate(src, tmp_path / "out")
    accelerate = not name.startswith("dcp")
    dcp_dir = src / "pytorch_model_fsdp_0" if accelerate else src
    assert ("accelerate FSDP (DCP) (2 ranks)" if accelerate else "torch DCP (2 ranks)") in res.stdout
    dcp_to_torch_save(str(dcp_dir), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    if accelerate:
        full = full["model"]
    ref = {_peft_key(k): v for k, v in full.items() if "lora_" in k or "trainable_tokens" in k}
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref), "differs from dcp_to_torch_save"
    diff = _peft_logits(run, tmp_path / "out")
    print(f"{name}: equal to dcp_to_torch_save; peft logits vs the engine's {diff:.2e}")
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("name", ["fsdp1-ranks-ours", "fsdp1-ranks-peft"])
def test_fsdp1_per_rank_sharded_files_equal_the_live_adapter(ckpts, name, tmp_path):
    """accelerate's save_fsdp_model(use_dcp=False): one torch.save of ShardedTensors per rank.
    Reassembled from the shards' offsets; equal to the live model's FULL_STATE_DICT adapter."""
    run = ckpts[name]
    got, res = _consolidate(run / "ckpt", tmp_path / "out")
    assert "FSDP1 sharded state dict (per-rank files) (2 ranks)" in res.stdout
    ref = {_peft_key(k): v for k, v in torch.load(run / "reference.pt", weights_only=True).items()}
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    diff = _peft_logits(run, tmp_path / "out")
    print(f"{name}: equal to the live adapter; peft logits vs the engine's {diff:.2e}")
    assert diff <= LOGIT_TOL
    (run / "ckpt" / "pytorch_model_fsdp_0_rank1.bin").rename(tmp_path / "moved.bin")
    try:
        err = _error(run / "ckpt", tmp_path)
        assert "pytorch_model_fsdp_0_rank1.bin" in err and "missing" in err and "2 ranks" in err, err
    finally:
        (tmp_path / "moved.bin").rename(run / "ckpt" / "pytorch_model_fsdp_0_rank1.bin")


def test_fsdp1_local_state_dict_is_refused_with_the_reason(ckpts, tmp_path):
    err = _error(ckpts["fsdp1-local-peft"] / "ckpt", tmp_path)
    assert "pytorch_model_fsdp_rank0.bin" in err and "LOCAL_STATE_DICT" in err and "SHARDED_STATE_DICT" in err, err


def test_single_state_dict_files(tmp_path):
    """A whole model's state dict in one file (FSDP1 FULL_STATE_DICT's pytorch_model_fsdp.bin, a
    safetensors file): the adapter keys are taken, wrappers stripped."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from helpers import randomize_trainable, tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_trainable(model)
    state = {f"_fsdp_wrapped_module.{k}": v for k, v in model.state_dict().items()}
    (tmp_path / "fsdp").mkdir()
    torch.save(state, tmp_path / "fsdp" / "pytorch_model_fsdp.bin")
    save_file(state, tmp_path / "model.safetensors")
    model.save_pretrained(tmp_path / "peft")
    ref = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for src in (tmp_path / "fsdp", tmp_path / "model.safetensors"):
        got, res = _consolidate(src, tmp_path / f"out_{src.name}", "--config", str(tmp_path / "peft"))
        assert "single state-dict file" in res.stdout
        assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def _refused(res, *fragments):
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
        res.stderr[-2000:]
    assert all(f in res.stderr for f in fragments), res.stderr


def test_dtype_and_inferred_config_never_guesses_alpha(ckpts, tmp_path):
    """--dtype bf16 converts. Without any adapter_config.json, r, rank_pattern and target_modules
    come from the shapes, but lora_alpha is in no tensor: conversion refuses and names --config,
    --lora-alpha and --guess-alpha (issue 17, rule 3); --lora-alpha gives the trained model
    (peft's logits), --guess-alpha writes alpha = r and says so; trainable tokens without a config
    are refused even with --guess-alpha (their indices are in no tensor)."""
    src = tmp_path / "bare"
    shutil.copytree(ckpts["zero2-peft"] / "ckpt", src)  # no adapter_config.json anywhere above
    refused = cli("consolidate", str(src), str(tmp_path / "out"), "--quiet")
    _refused(refused, "--config", "--lora-alpha", "--guess-alpha", "lora_alpha")
    assert not (tmp_path / "out").exists()
    got, res = _consolidate(src, tmp_path / "out", "--dtype", "bf16", "--lora-alpha", "6")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert "warning: no adapter_config.json found: inferred r=3" in res.stderr and "lora_alpha=6" in res.stderr
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 6
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    assert set(config["rank_pattern"].values()) == {4} and all("down_proj" in k for k in config["rank_pattern"])
    ref, _ = _consolidate(ckpts["zero2-peft"] / "ckpt", tmp_path / "ref")
    assert all(torch.equal(got[k], ref[k].to(torch.bfloat16)) for k in ref)
    fp32, _ = _consolidate(src, tmp_path / "fp32", "--lora-alpha", "6e0")  # any float() spelling
    assert _peft_logits(ckpts["zero2-peft"], tmp_path / "fp32") <= LOGIT_TOL
    guessed, res = _consolidate(src, tmp_path / "guessed", "--guess-alpha")
    assert "GUESSED" in res.stderr
    assert json.loads((tmp_path / "guessed" / "adapter_config.json").read_text())["lora_alpha"] == 3
    assert _peft_logits(ckpts["zero2-peft"], tmp_path / "guessed") > 1e-2  # what a guess costs
    _refused(cli("consolidate", str(ckpts["zero2-peft"] / "ckpt"), str(tmp_path / "x"), "--lora-alpha", "5"),
             "--lora-alpha 5", "lora_alpha=6")
    tokens = tmp_path / "tokens"
    shutil.copytree(ckpts["zero1-ours"] / "ckpt", tokens)
    _refused(cli("consolidate", str(tokens), str(tmp_path / "t"), "--guess-alpha"), "trainable tokens", "--config")


def test_consolidate_never_replaces_an_existing_adapter(ckpts, tmp_path):
    """OUT that exists and holds files is refused, its files unchanged, unless --overwrite
    (issue 17, rule 4); an empty OUT is fine."""
    src = ckpts["zero2-peft"] / "ckpt"
    (tmp_path / "out").mkdir()
    _consolidate(src, tmp_path / "out")  # empty: written
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "out" / "adapter_config.json").write_text("{}")  # make a rewrite visible
    before["adapter_config.json"] = b"{}"
    _refused(cli("consolidate", str(src), str(tmp_path / "out"), "--quiet"), "already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    (tmp_path / "file").write_text("keep")
    _refused(cli("consolidate", str(src), str(tmp_path / "file"), "--quiet"), "is a file")
    assert (tmp_path / "file").read_text() == "keep"
    _consolidate(src, tmp_path / "out", "--overwrite")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 3


def test_inspect_lists_format_stage_tag_keys_and_config(ckpts):
    res = cli("inspect", str(ckpts["zero3-ours"] / "ckpt"))
    assert res.returncode == 0, res.stderr
    for line in ("format             DeepSpeed ZeRO-3", "world_size         2", "stage              3",
                 "tag                global_step2", "adapter tensors    29"):
        assert line in res.stdout, res.stdout
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in res.stdout and "(4, 45)" in res.stdout
    assert "token_adapter.trainable_tokens_delta" in res.stdout and '"trainable_token_indices"' in res.stdout
    res = cli("inspect", "--json", str(ckpts["accelerate-peft"] / "ckpt"))
    info = json.loads(res.stdout)
    assert info["format"] == "accelerate FSDP (DCP)" and info["world_size"] == 2
    assert info["adapter"]["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"] == {
        "shape": [45, 3], "dtype": "float32"}


def test_tag_option_and_source_untouched(ckpts, tmp_path):
    src = tmp_path / "ds"
    shutil.copytree(ckpts["zero3-ours"] / "ckpt", src)
    shutil.copytree(src / "global_step2", src / "older")  # a second tag; 'latest' still names global_step2
    before = {p: os.path.getmtime(p) for p in src.rglob("*")}
    _, res = _consolidate(src, tmp_path / "a", "--tag", "older", "--config", str(ckpts["zero3-ours"]))
    assert "tag older" in res.stdout
    assert {p: os.path.getmtime(p) for p in src.rglob("*")} == before
    res = cli("consolidate", str(src), str(src / "out"))
    assert res.returncode == 2 and "overlap" in res.stderr and not (src / "out").exists()
    err = _error(src, tmp_path, "--tag", "global_step9")
    assert str(src / "global_step9") in err and "no such tag" in err and "older" in err, err


def test_split_fused_projection(ckpts, tmp_path):
    """--split cuts a fused projection's lora_B by rows and shares lora_A: here k_proj is split
    into two halves and the halves' outputs stack to the original."""
    got, _ = _consolidate(ckpts["zero2-ours"] / "ckpt", tmp_path / "whole")
    split, _ = _consolidate(ckpts["zero2-ours"] / "ckpt", tmp_path / "split", "--split", "k_proj=k_lo:6,k_hi:6")
    key = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
    assert torch.equal(torch.cat([split[key.format("k_lo", "B")], split[key.format("k_hi", "B")]]),
                       got[key.format("k_proj", "B")])
    assert torch.equal(split[key.format("k_lo", "A")], got[key.format("k_proj", "A")])
    assert key.format("k_proj", "A") not in split
    config = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert "k_lo" in config["target_modules"] and "k_proj" not in config["target_modules"]
    res = cli("consolidate", str(ckpts["zero2-ours"] / "ckpt"), str(tmp_path / "bad"), "--split", "k_proj=a:5,b:5")
    assert res.returncode == 2 and "k_proj" in res.stderr and "12 output rows" in res.stderr


# ----------------------------------------------------------------------------- safety and errors
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _error(src, tmp_path, *extra):
    res = cli("consolidate", str(src), str(tmp_path / "never"), "--quiet", *extra)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and not (tmp_path / "never" / "adapter_model.safetensors").exists()
    return res.stderr


def test_code_running_pickles_are_refused(ckpts, tmp_path):
    """An optimizer file and a DCP .metadata whose unpickling would run `touch MARKER`: refused,
    naming the class and the file; the marker never appears."""
    marker = tmp_path / "marker"
    src = tmp_path / "ds"
    shutil.copytree(ckpts["zero2-ours"] / "ckpt", src)
    victim = src / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = {"optimizer_state_dict": {"zero_stage": 2, "payload": _RunsCode(marker)}}
    torch.save(state, victim)
    err = _error(src, tmp_path)
    assert "system" in err and str(victim) in err and "refusing to unpickle" in err, err
    assert not marker.exists()
    dcp = tmp_path / "dcp"
    shutil.copytree(ckpts["dcp-ours"] / "ckpt", dcp)
    (dcp / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    err = _error(dcp, tmp_path)
    assert "system" in err and str(dcp / ".metadata") in err, err
    assert not marker.exists()
    with zipfile.ZipFile(victim) as zf:  # the allow-list holds DeepSpeed's classes, not this one
        assert any(n.endswith("data.pkl") for n in zf.namelist())


def test_truncated_missing_and_mismatched_rank_files_name_the_file(ckpts, tmp_path):
    src = tmp_path / "ds"
    shutil.copytree(ckpts["zero3-ours"] / "ckpt", src)
    tag = src / "global_step2"
    rank1 = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = rank1.read_bytes()
    rank1.write_bytes(data[: len(data) // 2])
    err = _error(src, tmp_path)
    assert str(rank1) in err and "truncated" in err, err
    rank1.unlink()
    err = _error(src, tmp_path)
    assert str(rank1) in err and "missing" in err and "2 ranks" in err, err
    rank1.write_bytes(data)
    shutil.copy(rank1, tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")  # a leftover of a 3-rank run
    err = _error(src, tmp_path)
    assert str(tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt") in err and "world size" in err, err
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    shutil.copy(ckpts["zero2-ours"] / "ckpt" / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", rank1)
    err = _error(src, tmp_path)  # a rank file of another run (stage 2)
    assert str(rank1) in err, err

    dcp = tmp_path / "dcp"
    shutil.copytree(ckpts["dcp-ours"] / "ckpt", dcp)
    shard = dcp / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    err = _error(dcp, tmp_path)
    assert str(shard) in err and "truncated" in err, err
    shard.unlink()
    err = _error(dcp, tmp_path)
    assert str(shard) in err and "missing" in err and "2 ranks" in err, err


def test_shape_checks_name_the_key_and_config(ckpts, tmp_path):
    cfg = json.loads((ckpts["zero2-peft"] / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    err = _error(ckpts["zero2-peft"] / "ckpt", tmp_path, "--config", str(tmp_path / "adapter_config.json"))
    assert "down_proj.lora_A.weight" in err and "r=3" in err and str(tmp_path / "adapter_config.json") in err, err
    cfg = json.loads((ckpts["zero1-ours"] / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = [3, 5]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    err = _error(ckpts["zero1-ours"] / "ckpt", tmp_path, "--config", str(tmp_path / "adapter_config.json"))
    assert "trainable_tokens_delta" in err and "3 token rows" in err and "2 token indices" in err, err
    err = _error(tmp_path / "nowhere", tmp_path)
    assert "nowhere" in err and "no such file" in err


def test_recipe_checkpoints_consolidate(single_run, tmp_path):
    """A dist-adapters run directory and its checkpoints/step_N are PEFT directories already:
    validated and re-saved unchanged."""
    got, res = _consolidate(single_run / "checkpoints" / "step_2", tmp_path / "out")
    assert "PEFT adapter directory" in res.stdout
    ref = load_file(single_run / "checkpoints" / "step_2" / "adapter" / "adapter_model.safetensors")
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_zero_consolidation_imports_no_torch_and_api_names_stay_functions(ckpts, tmp_path):
    """The DeepSpeed path runs without importing torch (the benchmark's speed and memory come from
    that); and the lazily resolved public API keeps `da.inject` / `da.merge` the functions even
    when their submodules were imported first."""
    code = ("import sys; from dist_adapters.cli import main; "
            f"rc = main(['consolidate', {str(ckpts['zero3-ours'] / 'ckpt')!r}, {str(tmp_path / 'out')!r}, '--quiet']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'; "
            "import dist_adapters.inject, dist_adapters.merge; import dist_adapters as da; "
            "assert callable(da.inject) and callable(da.merge) and callable(da.unload), (da.inject, da.merge)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert len(got) == 29


def test_adapter_name_strip_prefix_and_fp16_options(tmp_path):
    """A state dict holding two adapters under an outer 'wrapper.' prefix: --strip-prefix removes
    it, --adapter-name picks one (default: 'default'), --dtype fp16 converts; each output equals
    what peft itself saves for that adapter."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from helpers import randomize_trainable, tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_trainable(model)
    model.base_model.set_adapter(["default", "other"])
    randomize_trainable(model, seed=5)
    save_file({f"wrapper.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    model.save_pretrained(tmp_path / "peft")  # default/ at the top, other/ in a subfolder
    for name, config, extra in (("default", tmp_path / "peft", []),
                                ("other", tmp_path / "peft" / "other", ["--adapter-name", "other"])):
        got, _ = _consolidate(tmp_path / "model.safetensors", tmp_path / f"out_{name}", "--strip-prefix", "wrapper.",
                              "--dtype", "fp16", "--config", str(config), *extra)
        ref = load_file(config / "adapter_model.safetensors")
        assert sorted(got) == sorted(ref) and all(t.dtype == torch.float16 for t in got.values())
        assert all(torch.equal(got[k], ref[k].to(torch.float16)) for k in ref), name  # one cast of the same data
    err = _error(tmp_path / "model.safetensors", tmp_path, "--strip-prefix", "wrapper.", "--adapter-name", "nope",
                 "--config", str(tmp_path / "peft"))
    assert "no adapter named 'nope'" in err and "'other'" in err, err


def test_consolidation_memory_stays_near_the_adapter_size(ckpts, tmp_path):
    """A ZeRO-3 checkpoint of a Llama with ~31M frozen parameters (124 MB fp32 in the files) and a
    1 MB adapter: the consolidating process grows by about the adapter (the frozen tensors are
    never read) and stays below adapter + 250 MB (README, consolidate benchmark)."""
    run = ckpts["big-zero3-ours"]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child of this pytest
    # process would report pytest's own peak (measured: 519 MB for any consolidation)
    code = ("import re, sys; from dist_adapters.cli import main\n"
            "def vm(k): return int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
            "before = vm('VmRSS')\n"
            "rc = main(['consolidate', sys.argv[1], sys.argv[2], '--quiet'])\n"
            "print(rc, before, vm('VmHWM'))\n")
    res = subprocess.run([sys.executable, "-c", code, str(run / "ckpt"), str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rc, before, peak = (int(x) for x in res.stdout.split()[-3:])
    adapter = os.path.getsize(tmp_path / "out" / "adapter_model.safetensors")
    frozen = sum(f.stat().st_size for f in (run / "ckpt").rglob("*model_states.pt"))
    mb = 2 ** 20
    print(f"consolidate: peak RSS {peak / mb:.1f} MB ({(peak - before) / mb:.1f} MB above the imports); adapter "
          f"{adapter / mb:.2f} MB; frozen model states in the checkpoint {frozen / mb:.1f} MB")
    assert rc == 0 and frozen > 100 * mb
    assert peak < adapter + 250 * mb
    # measured 30.4 MB above the imports (42.7 MB in all): modules imported on the way, buffers, the
    # adapter; the frozen model states alone are 118 MB
    assert peak - before < 0.5 * frozen


def test_zip_record_crc32_is_checked(ckpts, tmp_path):
    """Issue 22: a flipped bit inside a ZeRO file's tensor record was read as data (the reader
    memory-maps records); every record read is now checked against its zip CRC32, and one bit
    in the adapter's fp32 partition is a one-line error naming the file and the record."""
    src = tmp_path / "ckpt"
    shutil.copytree(ckpts["zero2-ours"] / "ckpt", src)
    optim = src / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(optim) as zf:  # the largest record: the fp32 partition and its moments
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(optim.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x04
    optim.write_bytes(bytes(raw))
    err = _error(src, tmp_path, "--config", str(ckpts["zero2-ours"] / "adapter_config.json"))
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in err and "CRC32" in err and info.filename in err, err


FUZZ_SOURCES = {  # name: (checkpoint, its adapter_config.json or None, whether the format has a checksum)
    "zero2": (lambda c, r: c["zero2-ours"] / "ckpt", lambda c, r: c["zero2-ours"] / "adapter_config.json", True),
    "fsdp1-ranks": (lambda c, r: c["fsdp1-ranks-ours"] / "ckpt",
                    lambda c, r: c["fsdp1-ranks-ours"] / "adapter_config.json", True),
    "recipe": (lambda c, r: r / "checkpoints" / "step_2", lambda c, r: None, True),
    "dcp": (lambda c, r: c["dcp-ours"] / "ckpt", lambda c, r: c["dcp-ours"] / "adapter_config.json", False),
}


def _tensor_span(path, rng) -> tuple[int, int]:
    """The bytes of one random tensor record of a torch zip or safetensors file (where a flip
    changes a value rather than the structure); the whole file for other formats."""
    raw = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            records = [i for i in zf.infolist() if "/data/" in i.filename and i.file_size]
        if records:
            info = records[rng.randrange(len(records))]
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            return start, start + info.file_size
    if path.suffix == ".safetensors":
        (n,) = struct.unpack("<Q", raw[:8])
        return 8 + n, len(raw)
    return 0, len(raw)


def _mutate(src, dst, rng) -> str:
    """Copy ``src`` to ``dst`` and damage one file: truncate it, or flip 1-8 bytes / zero a range,
    half of the time inside one tensor's bytes (what a reader without a checksum takes as data)."""
    shutil.copytree(src, dst)
    files = sorted(p for p in dst.rglob("*") if p.is_file() and p.stat().st_size)
    target = files[rng.randrange(len(files))]
    raw = bytearray(target.read_bytes())
    kind = rng.choice(["truncate", "flip", "zero"])
    lo, hi = _tensor_span(target, rng) if rng.random() < 0.5 else (0, len(raw))
    if kind == "truncate":
        raw = raw[:rng.randrange(len(raw))]
    elif kind == "flip":
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    else:
        start = rng.randrange(lo, hi)
        end = min(hi, start + rng.randint(1, 4096))
        raw[start:end] = bytes(end - start)
    target.write_bytes(bytes(raw))
    return f"{kind} {target.relative_to(dst)}" + (f" [{lo}:{hi}]" if (lo, hi) != (0, len(raw)) else "")


def test_fuzzed_checkpoints_end_in_a_clear_error_or_the_clean_adapter(ckpts, single_run, tmp_path):
    """Issue 22: 100 seeded mutations (25 per source) of ZeRO-2, FSDP1 per-rank, recipe and DCP
    checkpoints of our own making, each converted as its own process. Every case ends in a
    one-line error (exit 2, no traceback, nothing written) or in exactly the clean conversion;
    none in a silently different adapter where the format has a checksum (ZeRO and FSDP1 files:
    zip CRC32; recipe checkpoints: the sha256 manifests). DCP shards have none: their silent
    cases are counted and printed (README, limits)."""
    import random

    from recipe_helpers import cli_forked

    clean, argvs, what = {}, {}, {}
    for name, (src_of, config_of, _) in FUZZ_SOURCES.items():
        src, config = src_of(ckpts, single_run), config_of(ckpts, single_run)
        extra = ["--config", str(config)] if config else []
        clean[name], _ = _consolidate(src, tmp_path / f"clean_{name}", *extra)
        rng = random.Random(f"fuzz-{name}")
        for i in range(25):
            case = f"{name}-{i}"
            what[case] = _mutate(src, tmp_path / "src" / case, rng)
            argvs[case] = ["consolidate", str(tmp_path / "src" / case), str(tmp_path / "out" / case), "--quiet", *extra]
    results = cli_forked(argvs)
    tally, silent = {"error": 0, "identical": 0, "silent": 0}, []
    for case, res in sorted(results.items()):
        name = case.rsplit("-", 1)[0]
        out = tmp_path / "out" / case / "adapter_model.safetensors"
        if res.returncode == 2:
            assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, (case, what[case],
                                                                                               res.stderr[-2000:])
            assert not out.exists(), (case, what[case])
            tally["error"] += 1
            continue
        assert res.returncode == 0, (case, what[case], res.returncode, res.stderr[-2000:])
        got = load_file(out)
        # bitwise: both conversions copy the same stored bytes, no arithmetic in between
        if sorted(got) == sorted(clean[name]) and all(torch.equal(got[k], clean[name][k]) for k in got):
            tally["identical"] += 1
            continue
        assert not FUZZ_SOURCES[name][2], f"{case} ({what[case]}): a silently different adapter from a checksummed format"
        tally["silent"] += 1
        silent.append(f"{case}: {what[case]}")
    print(f"fuzz: {len(results)} cases: {tally}; silent (DCP, no checksum): {silent}")
    assert len(results) == 100 and tally["error"] >= 20


def test_consolidate_verify(ckpts, single_run, tmp_path):
    """Issue 22, `consolidate --verify`: a source of ours is checked against its live-model record;
    a DeepSpeed checkpoint (no record) must load onto the base, give finite logits and change
    them, and gets a record that `verify OUT` then reproduces; an all-zero adapter (an empty
    gather) is refused."""
    run = ckpts["zero2-ours"]
    res = cli("consolidate", str(run / "ckpt"), str(tmp_path / "zero"), "--quiet", "--verify", "--base",
              str(run / "base_model"))
    assert res.returncode == 0 and "verify: OK" in res.stdout and "move by up to" in res.stdout, res.stderr[-2000:]
    assert cli("verify", str(tmp_path / "zero")).returncode == 0
    res = cli("consolidate", str(single_run / "checkpoints" / "step_2"), str(tmp_path / "ours"), "--quiet", "--verify")
    assert res.returncode == 0 and "match the live model" in res.stdout, res.stderr[-2000:]
    zeros = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"):  # a training script's names
             torch.zeros_like(v) if "lora_B" in k else v
             for k, v in load_file(tmp_path / "zero" / "adapter_model.safetensors").items()}
    from safetensors.torch import save_file

    save_file(zeros, tmp_path / "empty.safetensors")
    res = cli("consolidate", str(tmp_path / "empty.safetensors"), str(tmp_path / "empty"), "--quiet", "--verify",
              "--config", str(run / "adapter_config.json"), "--base", str(run / "base_model"))
    assert res.returncode == 1 and "does not change the base model's logits" in res.stderr, res.stderr[-2000:]


def test_trainer_fsdp_checkpoint_layout(ckpts, tmp_path):
    """Issue 22: what the Trainer writes under FSDP (SHARDED_STATE_DICT): accelerate's
    `pytorch_model_fsdp_0/` inside `checkpoint-N/`, among the Trainer's own files, one of which
    (training_args.bin) pickles a TrainingArguments. The real FSDP2 save of `accelerate-peft`
    placed so; the adapter comes out equal to the one of the bare DCP directory."""
    from transformers import TrainingArguments

    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(ckpts["accelerate-peft"] / "ckpt", ckpt)
    shutil.copy(ckpts["accelerate-peft"] / "adapter_config.json", ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    torch.save(TrainingArguments(output_dir=str(tmp_path), use_cpu=True), ckpt / "training_args.bin")
    torch.save({"python": 0, "cpu": torch.get_rng_state()}, ckpt / "rng_state_0.pth")
    (ckpt / "optimizer_0").mkdir()
    got, res = _consolidate(ckpt, tmp_path / "out")
    want, _ = _consolidate(ckpts["accelerate-peft"] / "ckpt", tmp_path / "bare")
    assert "pytorch_model_fsdp_0" in res.stdout or "DCP" in res.stdout, res.stdout
    # bitwise: the same DCP shards read twice, bytes copied
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
