"""merge / unmerge / unload / disabled / set_adapter on plain models."""

import pytest
import torch
from torch import nn

import dist_adapters as da
from dist_adapters.layers.lora import LoraEmbedding, LoraLinear
from dist_adapters.layers.modules_to_save import ModulesToSave
from helpers import (LOGITS_TOL, MODELS, WEIGHTS_TOL, expected_merged, logits, max_diff, merged_flags,
                     randomize_trainable)

CONFIGS = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                  modules_to_save=["lm_head"]),
    "gpt2": dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
}


def _adapted(arch):
    model = da.inject(MODELS[arch](), da.LoraConfig(**CONFIGS[arch]))
    randomize_trainable(model)
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_merge_keeps_logits_and_unmerge_restores_weights(arch):
    """merge writes W + scaling * B @ A into every adapted base weight (computed in the test from
    the factors; the delta is far above the tolerance, so a merge that does nothing fails)."""
    model = _adapted(arch)
    before = logits(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    target = expected_merged(model)
    da.merge(model)
    assert merged_flags(model) == ["['default']"]
    got = dict(model.named_parameters())
    assert max((target[n] - base_weights[n]).abs().max().item() for n in target) > 1e-2
    assert max(max_diff(got[n], target[n]) for n in target) <= WEIGHTS_TOL  # measured 0.0
    assert max_diff(logits(model), before) <= LOGITS_TOL  # measured 1.8e-7 to 3.2e-7
    da.unmerge(model)
    assert merged_flags(model) == ["[]"]
    for n, p in model.named_parameters():
        if n in base_weights:
            assert max_diff(p, base_weights[n]) <= WEIGHTS_TOL, n  # measured 0 to 3e-8
    assert max_diff(logits(model), before) <= LOGITS_TOL


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_unload_merge_leaves_plain_modules_with_same_logits(arch):
    model = _adapted(arch)
    before = logits(model)
    plain = da.unload(model, merge=True)
    kinds = {type(m) for m in plain.modules()}
    assert not kinds & {LoraLinear, LoraEmbedding, ModulesToSave}
    assert not any(".lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert max_diff(logits(plain), before) <= LOGITS_TOL  # measured 1.8e-7 to 3.2e-7


def test_unload_without_merge_gives_the_base_model_back():
    base = logits(MODELS["llama"]())
    plain = da.unload(_adapted("llama"), merge=False)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    assert max_diff(logits(plain), base) == 0.0  # the base module itself, the same ops


def test_disabled_runs_the_base_model_even_when_merged():
    model = _adapted("llama")
    base = logits(MODELS["llama"]())
    adapted = logits(model)
    with da.disabled(model):
        assert max_diff(logits(model), base) == 0.0  # adapters skipped: the base's ops alone
    assert max_diff(logits(model), adapted) == 0.0  # the same ops as before on the same weights
    da.merge(model)
    with da.disabled(model):  # unmerges on the way, as peft does
        assert max_diff(logits(model), base) <= LOGITS_TOL  # measured 1.5e-7
    assert max_diff(logits(model), adapted) <= LOGITS_TOL  # measured 1.8e-7


def test_several_named_adapters_and_set_adapter():
    model = da.inject(MODELS["llama"](), da.LoraConfig(r=4, target_modules=["q_proj"]))
    da.inject(model, da.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    randomize_trainable(model, seed=1)
    da.set_adapter(model, "b")
    randomize_trainable(model, seed=2)
    layer = model.model.layers[0].self_attn.q_proj
    assert set(layer.adapter_names()) == {"default", "b"}
    # only the active adapter trains
    assert all(p.requires_grad for p in layer.lora_A["b"].parameters())
    assert not any(p.requires_grad for p in layer.lora_A["default"].parameters())
    out_b = logits(model)
    da.set_adapter(model, "default")
    out_default = logits(model)
    assert max_diff(out_b, out_default) > 1e-3
    da.set_adapter(model, "b")
    assert max_diff(logits(model), out_b) == 0.0  # the same ops on the same weights
    with pytest.raises(KeyError, match="no adapter named 'c'.*'b', 'default'"):
        da.set_adapter(model, "c")


def test_merge_of_bf16_base_stays_bf16():
    """The fp32 delta is added to the bf16 weight in fp32 and rounded once: exactly
    (W.float() + scaling * B @ A).to(bf16)."""
    model = MODELS["llama"]().to(torch.bfloat16)
    da.inject(model, da.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters train in fp32
    randomize_trainable(model)
    w = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    target = (w.float() + (b @ a) * layer.scaling["default"]).to(torch.bfloat16)
    before = logits(model).float()
    da.merge(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.merged_adapters == ["default"]
    # bitwise: merge runs exactly these ops on these values (same machine)
    assert torch.equal(layer.base_layer.weight, target) and not torch.equal(target, w)
    # bf16 rounding of the merged weights moves the logits by 2e-3 (measured), half the adapter's
    # whole effect (3.9e-3): the logits cannot tell a merge from none here, the weights above can
    assert max_diff(logits(model).float(), before) <= 0.02
