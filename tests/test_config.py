"""adapter_config.json both ways, unknown keys kept, and every validation error's message."""

import json

import pytest
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, get_peft_model

import dist_adapters as da
from dist_adapters.config import config_from_dict, load_config
from helpers import tiny_llama


def test_peft_json_reads_and_writes_back_unchanged(tmp_path):
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 8}, modules_to_save=["lm_head"], use_rslora=True, bias="none"))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    original = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config = load_config(str(tmp_path / "peft"))
    assert isinstance(config, da.LoraConfig)
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 16, True)
    assert config.rank_pattern == {"q_proj": 2} and config.alpha_pattern == {"v_proj": 8}
    config.save(str(tmp_path / "ours"))
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key, value in original.items():  # every key peft wrote comes back with its value
        expected = sorted(value) if key == "target_modules" else value
        got = sorted(written[key]) if key == "target_modules" else written[key]
        assert got == expected, key


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "my_tool_note": {"run": 7},
            "future_peft_field": [1, 2]}
    config = config_from_dict(data)
    assert config.extra == {"my_tool_note": {"run": 7}, "future_peft_field": [1, 2]}
    config.save(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["my_tool_note"] == {"run": 7} and written["future_peft_field"] == [1, 2]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*\.q_proj"])
def test_our_json_loads_in_peft(tmp_path, targets):
    config = da.LoraConfig(r=6, lora_alpha=3, target_modules=targets, exclude_modules=["o_proj"],
                           layers_to_transform=None, lora_dropout=0.05, bias="lora_only",
                           rank_pattern={"v_proj": 2}, task_type="CAUSAL_LM",
                           base_model_name_or_path="some/model")
    config.save(str(tmp_path))
    theirs = PeftConfig.from_pretrained(str(tmp_path))
    assert theirs.peft_type == "LORA" and theirs.task_type == "CAUSAL_LM"
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout, theirs.bias) == (6, 3, 0.05, "lora_only")
    assert theirs.rank_pattern == {"v_proj": 2} and theirs.base_model_name_or_path == "some/model"
    assert (set(theirs.target_modules) == set(targets)) if isinstance(targets, list) else theirs.target_modules == targets
    # the regex stays a string, a list stays a list
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert type(written["target_modules"]) is type(targets)


def test_trainable_tokens_and_loftq_configs_roundtrip(tmp_path):
    tt = da.TrainableTokensConfig(token_indices=[3, 5], target_modules=["embed_tokens"], init_weights=False)
    tt.save(str(tmp_path / "tt"))
    back = load_config(str(tmp_path / "tt"))
    assert isinstance(back, da.TrainableTokensConfig)
    assert (back.token_indices, back.target_modules, back.init_weights) == ([3, 5], ["embed_tokens"], False)
    assert PeftConfig.from_pretrained(str(tmp_path / "tt")).token_indices == [3, 5]
    lq = da.LoraConfig(init_lora_weights="loftq", loftq_config=da.LoftQConfig(loftq_bits=2, loftq_iter=3))
    lq.save(str(tmp_path / "lq"))
    back = load_config(str(tmp_path / "lq"))
    assert back.loftq_config == da.LoftQConfig(loftq_bits=2, loftq_iter=3)
    assert PeftConfig.from_pretrained(str(tmp_path / "lq")).loftq_config == {"loftq_bits": 2, "loftq_iter": 3}


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), r"LoraConfig.r must be a positive integer, got 0"),
    (dict(r=-3), r"LoraConfig.r must be a positive integer, got -3"),
    (dict(r=2.5), r"LoraConfig.r must be a positive integer, got 2.5"),
    (dict(lora_alpha=0), r"LoraConfig.lora_alpha must be > 0, got 0"),
    (dict(lora_alpha=-1.0), r"LoraConfig.lora_alpha must be > 0, got -1.0"),
    (dict(lora_dropout=1.0), r"LoraConfig.lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(lora_dropout=-0.1), r"LoraConfig.lora_dropout must be in \[0, 1\), got -0.1"),
    (dict(bias="some"), r"LoraConfig.bias must be 'none', 'all' or 'lora_only', got 'some'"),
    (dict(init_lora_weights="pissa_niter_x"), r"init_lora_weights must be True, False, 'gaussian', 'loftq', "
                                              r"'pissa', 'pissa_niter_K' or 'olora'"),
    (dict(init_lora_weights="loftq"), r"loftq_config must be set when init_lora_weights='loftq'"),
    (dict(loftq_config={"loftq_bits": 4}), r"loftq_config is set but init_lora_weights is not 'loftq'"),
    (dict(rank_pattern={"q_proj": 0}), r"LoraConfig.rank_pattern\['q_proj'\] must be > 0, got 0"),
    (dict(alpha_pattern={"v_proj": -2}), r"LoraConfig.alpha_pattern\['v_proj'\] must be > 0, got -2"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), r"layers_to_transform cannot be used when target_modules is a str"),
    (dict(target_modules=".*q_proj", layers_pattern="layers"), r"layers_pattern cannot be used when target_modules is a str"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), r"layers_pattern is set but layers_to_transform is not"),
])
def test_lora_config_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        da.LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_indices=[]), r"TrainableTokensConfig.token_indices is empty"),
    (dict(token_indices=[1, 2, 1]), r"TrainableTokensConfig.token_indices has duplicate token indices \[1\]"),
    (dict(token_indices=[4, -1]), r"TrainableTokensConfig.token_indices\[1\] = -1 is not a non-negative integer"),
    (dict(token_indices=[1], init_weights="yes"), r"init_weights must be True or False"),
])
def test_trainable_tokens_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        da.TrainableTokensConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loftq_bits=3), r"loftq_bits must be 2, 4 or 8, got 3"),
    (dict(loftq_iter=0), r"loftq_iter must be an integer >= 1, got 0"),
])
def test_loftq_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        da.LoftQConfig(**kwargs)


def test_json_errors_name_the_file_and_key(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_qalora": true}')
    with pytest.raises(ValueError, match=r"adapter_config.json.*'use_qalora'=True is a peft feature"):
        load_config(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}')
    with pytest.raises(ValueError, match=r"adapter_config.json: LoraConfig.r must be a positive integer"):
        load_config(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match=r"adapter_config.json: peft_type 'IA3' is not supported"):
        load_config(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4')
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        load_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json in"):
        load_config(str(tmp_path / "nowhere"))
