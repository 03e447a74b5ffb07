"""Layer math and initialisations, shard rule 1, atomic saves, no peft import, the CLI."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import dist_adapters as da
from dist_adapters.layers.lora import LoraEmbedding, LoraLinear
from helpers import (WEIGHTS_TOL, expected_merged, logits, max_diff, merged_flags, randomize_trainable, tiny_gpt2,
                     tiny_llama)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_init_is_a_noop_with_kaiming_A_and_zero_B():
    base = logits(tiny_llama())
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(logits(model), base)  # adding B = 0 exactly leaves every value as it is
    layer = model.model.layers[0].mlp.up_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) on fan_in
    assert a.abs().max() <= bound and a.abs().max() > bound / 2


def test_gaussian_init_has_std_one_over_r():
    model = nn.Sequential(nn.Linear(2048, 256))
    da.inject(model, da.LoraConfig(r=8, target_modules=["0"], init_lora_weights="gaussian"))
    a = model[0].lora_A["default"].weight
    assert abs(a.std().item() - 1 / 8) < 0.01
    assert torch.count_nonzero(model[0].lora_B["default"].weight) == 0


def test_init_false_is_random_and_not_a_noop():
    base = logits(tiny_llama())
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                  init_lora_weights=False))
    assert max_diff(logits(model), base) > 1e-3
    emb = model.model.embed_tokens
    assert torch.count_nonzero(emb.lora_embedding_A["default"].weight) > 0


def test_embedding_default_init_zero_A_normal_B():
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, target_modules=["embed_tokens"]))
    emb = model.model.embed_tokens
    assert isinstance(emb, LoraEmbedding)
    assert torch.count_nonzero(emb.lora_embedding_A["default"].weight) == 0
    assert emb.lora_embedding_B["default"].weight.std() > 0.5


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(rslora, expected):
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, lora_alpha=16, use_rslora=rslora, target_modules=["q_proj"]))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == expected


def test_linear_and_conv1d_math():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    for base, fan_in_fan_out in ((nn.Linear(16, 24), False), (Conv1D(24, 16), True)):
        layer = LoraLinear(base, fan_in_fan_out=fan_in_fan_out)
        layer.add_adapter("default", r=4, lora_alpha=12, init_lora_weights=False)
        layer.set_adapter(["default"])
        w = base.weight.T if fan_in_fan_out else base.weight  # [out, in]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = x @ w.T + base.bias + (x @ a.T @ b.T) * 3.0
        assert max_diff(layer(x), expected) <= 5e-6  # other op order; measured 4.8e-7
        assert (layer.in_features, layer.out_features) == (16, 24)


def test_dropout_applies_in_train_mode_only():
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"],
                                                  init_lora_weights=False))
    ids = torch.randint(0, 128, (1, 8))
    model.train()
    with torch.no_grad():
        assert max_diff(model(input_ids=ids).logits, model(input_ids=ids).logits) > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("make, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "wte"])])
def test_rule1_every_trainable_tensor_lives_in_a_leaf_with_uniform_requires_grad(make, targets):
    model = da.inject(make(), da.LoraConfig(r=4, target_modules=targets, modules_to_save=None))
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}"] = module
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        module = owners[name]
        assert len(list(module.children())) == 0, f"{name} is not in a leaf module"
        assert all(p.requires_grad for p in module.parameters()), f"{name} shares a module with frozen tensors"


def test_rule1_parents_read_adapter_weights_only_through_leaf_forward():
    """As FSDP frees unsharded weights outside a unit's forward: a leaf's weight exists only while
    the leaf runs. A parent that read ``lora_A.weight`` itself would get None and fail."""
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                  init_lora_weights=False))
    expected = logits(model)
    leaves = [m for m in model.modules() if type(m).__name__ in ("LoraFactor", "EmbeddingFactor")]
    assert len(leaves) == 2 * 3 + 2
    for leaf in leaves:
        real = leaf._parameters["weight"]
        leaf.register_forward_pre_hook(lambda m, args, real=real: m._parameters.__setitem__("weight", real))
        leaf.register_forward_hook(lambda m, args, out: m._parameters.__setitem__("weight", None))
        leaf._parameters["weight"] = None
    assert max_diff(logits(model), expected) == 0


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, target_modules=["q_proj"]))
    da.save_adapter(model, str(tmp_path))
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_trainable(model)

    import dist_adapters.checkpoint.peft_format as pf

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pf, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        da.save_adapter(model, str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "verification.json"]


def test_library_never_imports_peft():
    code = ("import sys, pkgutil, importlib, dist_adapters\n"
            "for m in pkgutil.walk_packages(dist_adapters.__path__, 'dist_adapters.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [m for m in sys.modules if m == 'peft' or m.startswith('peft.')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    for folder, _, files in os.walk(os.path.join(ROOT, "dist_adapters")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                assert not re.search(r"^\s*(import peft|from peft[ .])", text, re.M), f


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "dist_adapters.cli", "--version"], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == f"dist-adapters {da.__version__}"


def test_engine_wrapper_names_do_not_leak_into_saved_keys(tmp_path):
    """A DDP-wrapped model (one-process gloo group) saves exactly the plain model's keys and
    values, biases included (bias='all' reads parameter names); merge through the wrapper writes
    W + scaling * (B @ A).T into the Conv1D weight and unmerge takes it out again."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    plain = da.inject(tiny_gpt2(), da.LoraConfig(r=4, target_modules=["c_attn"], bias="all"))
    randomize_trainable(plain)
    expected = da.adapter_state_dict(plain)
    target = expected_merged(plain)
    before = {n: p.detach().clone() for n, p in plain.named_parameters() if not p.requires_grad}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(plain)
        got = da.adapter_state_dict(wrapped)
        da.save_adapter(wrapped, str(tmp_path))
        da.merge(wrapped)
        merged = {n: p.detach().clone() for n, p in plain.named_parameters() if not p.requires_grad}
        flags = merged_flags(plain)
        da.unmerge(wrapped)
    finally:
        dist.destroy_process_group()
    assert sorted(got) == sorted(expected) and any(k.endswith("ln_1.bias") for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in got)  # the same tensors, copied
    assert flags == ["['default']"] and merged_flags(plain) == ["[]"]
    assert max((target[n] - before[n]).abs().max().item() for n in target) > 1e-2
    assert max(max_diff(merged[n], target[n]) for n in target) <= WEIGHTS_TOL
    assert max(max_diff(p, before[n]) for n, p in plain.named_parameters() if n in before) <= WEIGHTS_TOL
