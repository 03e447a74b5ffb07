"""Bad input to inject / save / load: clear errors naming the pattern, key, file or option."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dist_adapters as da
from helpers import tiny_gpt2, tiny_llama


def test_target_entry_matching_nothing_names_it_and_lists_modules():
    with pytest.raises(ValueError, match=r"target_modules entry 'q_porj' matches no module in LlamaForCausalLM; "
                                         r"some module names: .*down_proj"):
        da.inject(tiny_llama(), da.LoraConfig(target_modules=["q_proj", "q_porj"]))


def test_regex_matching_nothing_names_it():
    with pytest.raises(ValueError, match=r"target_modules regex '.\*attn\\\\.qq' matches no module name"):
        da.inject(tiny_llama(), da.LoraConfig(target_modules=r".*attn\.qq"))


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match=r"target module 'model.layers.0.input_layernorm' is a LlamaRMSNorm, "
                                         r"which LoRA does not support \(supported: .*Linear"):
        da.inject(tiny_llama(), da.LoraConfig(target_modules=["input_layernorm"]))


def test_everything_filtered_out_is_an_error():
    with pytest.raises(ValueError, match=r"no module or parameter of LlamaForCausalLM was adapted: "
                                         r".*layers_to_transform=\[7\]"):
        da.inject(tiny_llama(), da.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_modules_to_save_matching_nothing():
    with pytest.raises(ValueError, match=r"modules_to_save entry 'score' matches no module"):
        da.inject(tiny_llama(), da.LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))


def test_same_adapter_name_twice():
    model = da.inject(tiny_llama(), da.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter 'default' already exists"):
        da.inject(model, da.LoraConfig(target_modules=["v_proj"]))


def test_no_default_targets_for_unknown_model():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"target_modules is None and model type None has no default"):
        da.inject(model, da.LoraConfig())


def test_loftq_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"loftq_config must be set when init_lora_weights='loftq'"):
        da.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match=r"LoftQConfig.loftq_bits must be 2, 4 or 8, got 3"):
        da.LoftQConfig(loftq_bits=3)
    with pytest.raises(ValueError, match=r"LoftQConfig.loftq_iter must be an integer >= 1, got 0"):
        da.LoftQConfig(loftq_iter=0)


def test_save_without_adapter_names_the_problem(tmp_path):
    with pytest.raises(KeyError, match=r"no adapter named 'default'.*call da.inject or da.load_adapter first"):
        da.save_adapter(tiny_llama(), str(tmp_path))


@pytest.fixture
def saved(tmp_path):
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, target_modules=["q_proj"]))
    da.save_adapter(model, str(tmp_path / "a"))
    return tmp_path / "a"


def test_shape_mismatch_names_key_and_file(saved):
    model = da.inject(tiny_llama(), da.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: key 'base_model.model.model.layers.0.self_attn"
                                         r".q_proj.lora_A.weight' has shape \(4, 32\), the model expects \(2, 32\)"):
        da.load_adapter(model, str(saved))


def test_truncated_safetensors_names_the_file(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        da.load_adapter(tiny_llama(), str(saved))


def test_corrupt_bin_names_the_file(saved):
    os.remove(saved / "adapter_model.safetensors")
    (saved / "adapter_model.bin").write_bytes(b"\x80\x04 this is not a checkpoint")
    with pytest.raises(ValueError, match=r"adapter_model.bin: not a readable weights-only torch file"):
        da.load_adapter(tiny_llama(), str(saved))


class Payload:  # an arbitrary object: unpickling it must be refused
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bin_with_arbitrary_objects_is_refused(saved):
    os.remove(saved / "adapter_model.safetensors")
    torch.save({"x": Payload()}, saved / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin: .*objects other than tensors"):
        da.load_adapter(tiny_llama(), str(saved))


def test_unexpected_and_missing_keys(saved):
    path = str(saved / "adapter_model.safetensors")
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"key '.*q_proj.lora_C.weight' matches no parameter of the model"):
        da.load_adapter(tiny_llama(), str(saved))
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"]
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: adapter 'default' is missing 1 tensor\(s\), "
                                         r"e.g. \['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'\]"):
        da.load_adapter(tiny_llama(), str(saved))


def test_missing_files_and_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter directory '.*nowhere' does not exist"):
        da.load_adapter(tiny_llama(), str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"no adapter_model.safetensors or adapter_model.bin in"):
        da.load_adapter(tiny_llama(), str(tmp_path))


def test_load_of_wrong_architecture(saved):
    with pytest.raises(ValueError, match=r"target_modules entry 'q_proj' matches no module in GPT2LMHeadModel"):
        da.load_adapter(tiny_gpt2(), str(saved))
