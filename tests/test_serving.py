"""Issue 22: ``--target vllm`` (consolidate and verify) flags each thing vLLM does not serve and
says what to change; a plain LoRA adapter passes. The rules are data with their sources
(dist_adapters/checkpoint/data/vllm_rules.json)."""

from __future__ import annotations

import json

import pytest

import dist_adapters as da
from dist_adapters.checkpoint import serving
from helpers import tiny_llama
from recipe_helpers import cli

PLAIN = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
CASES = {  # LoraConfig fields: a fragment of what the check must say
    "rank": ({"r": 32}, "rank 32 (r) is greater than --max-lora-rank 16: serve with --max-lora-rank 32"),
    "rank-pattern": ({"rank_pattern": {"v_proj": 96}},
                     "rank 96 (rank_pattern['v_proj']) is greater than --max-lora-rank 16: serve with --max-lora-rank 128"),
    "rank-beyond-vllm": ({"r": 600}, "retrain with a rank of at most 512"),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, "modules_to_save [\"lm_head\"]: vLLM only serves adapters"),
    "embedding-lora": ({"target_modules": ["q_proj", "embed_tokens"]}, "is a LoRA on an embedding"),
    "trainable-tokens": ({"trainable_token_indices": [3, 5]}, "trainable_token_indices [3, 5]: vLLM does not serve"),
    "dora": ({"use_dora": True}, "use_dora true: vLLM does not serve DoRA"),
    "bias": ({"bias": "lora_only"}, "bias \"lora_only\": vLLM refuses an adapter bias"),
}


def _saved(path, **fields):
    model = da.inject(tiny_llama(), da.LoraConfig(**{**PLAIN, **fields}))
    da.save_adapter(model, str(path))
    return path


def _config_and_keys(path):
    record = json.loads((path / "verification.json").read_text())
    return json.loads((path / "adapter_config.json").read_text()), list(record["tensors"])


def test_a_plain_lora_adapter_passes(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    da.save_adapter(da.inject(base, da.LoraConfig(**PLAIN)), str(tmp_path / "plain"))
    config, keys = _config_and_keys(tmp_path / "plain")
    assert serving.problems("vllm", config, keys) == []
    res = cli("consolidate", str(tmp_path / "plain"), str(tmp_path / "out"), "--target", "vllm", "--quiet")
    assert res.returncode == 0, res.stderr
    res = cli("verify", str(tmp_path / "plain"), "--target", "vllm", "--base", str(tmp_path / "base"))
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_incompatibility_is_flagged_with_what_to_change(tmp_path, name):
    fields, fragment = CASES[name]
    config, keys = _config_and_keys(_saved(tmp_path / name, **fields))
    found = serving.problems("vllm", config, keys)
    assert any(fragment in p for p in found), found
    assert all(": " in p for p in found)  # each says what to change after what is wrong


def test_the_cli_refuses_and_names_the_fix(tmp_path):
    _saved(tmp_path / "big", r=32, modules_to_save=["lm_head"])
    res = cli("consolidate", str(tmp_path / "big"), str(tmp_path / "out"), "--target", "vllm", "--quiet")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "2 thing(s) vllm will not accept" in res.stderr and "--max-lora-rank 32" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
    res = cli("verify", str(tmp_path / "big"), "--target", "vllm", "--max-lora-rank", "64")
    assert res.returncode == 1 and "modules_to_save" in res.stderr and "--max-lora-rank" not in res.stderr, res.stderr


def test_rule_set_is_data_with_sources():
    table = serving.rules("vllm")
    assert table["source"] and all("vllm" in s for s in table["source"])
    assert table["max_lora_ranks"][-1] == 512 and table["default_max_lora_rank"] == 16


def test_expert_lora_needs_both_3d_weights():
    """vLLM's 3-D MoE LoRA loader (lora/model_manager.py) reads experts.base_layer as
    gate_up_proj and experts as down_proj and asserts both: LoRA on one of them is flagged, on
    both passes (peft nests gate_up_proj inside whatever the order of target_parameters)."""
    import transformers as tf

    def keys_of(**fields):
        torch_model = tf.MixtralForCausalLM(tf.MixtralConfig(
            vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=16, num_local_experts=4, num_experts_per_tok=2))
        model = da.inject(torch_model, da.LoraConfig(r=2, **fields))
        return [k for k in da.adapter_state_dict(model)]

    both = keys_of(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"])
    assert any(".experts.base_layer.lora_A" in k for k in both) and any(".experts.lora_A" in k for k in both)
    assert serving.problems("vllm", {"r": 2}, both) == []
    one = keys_of(target_modules=["q_proj"], target_parameters=["down_proj"])
    found = serving.problems("vllm", {"r": 2}, one)
    assert len(found) == 1 and "'base_model.model.model.layers.0.mlp.experts'" in found[0], found
    assert "one of its two 3-D weights (experts.lora_A)" in found[0]
    assert "target both gate_up_proj and down_proj" in found[0]
    gate_up_only = keys_of(target_modules=["q_proj"], target_parameters=["gate_up_proj"])
    assert len(serving.problems("vllm", {"r": 2}, gate_up_only)) == 1
