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
