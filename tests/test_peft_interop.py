"""Interop with real peft, both ways: same logits (helpers.LOGITS_TOL; measured 0 to 1.2e-7) and
the same trainable parameter count."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

import dist_adapters as da
from helpers import LOGITS_TOL, MODELS, logits, max_diff, randomize_trainable, trainable_count

CASES = {
    "llama-list": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-regex": ("llama", dict(r=4, lora_alpha=16, target_modules=r".*\.(q|k)_proj")),
    "llama-all-linear": ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "llama-exclude": ("llama", dict(r=4, target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])),
    "llama-exclude-regex": ("llama", dict(r=4, target_modules=["q_proj", "k_proj"],
                                          exclude_modules=r"model\.layers\.0\..*")),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "up_proj"])),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                     rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6},
                                     alpha_pattern={"v_proj": 3, "model.layers.2.self_attn.q_proj": 5})),
    "llama-modules-to-save": ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama-layers-to-transform": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"],
                                                layers_to_transform=[0, 2], layers_pattern="layers")),
    "llama-layer-int": ("llama", dict(r=4, target_modules=["gate_proj"], layers_to_transform=1)),
    "llama-dropout": ("llama", dict(r=4, lora_dropout=0.1, target_modules=["k_proj"])),
    "gpt2-all-linear": ("gpt2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "gpt2-conv1d-bias-all": ("gpt2", dict(r=4, target_modules=["c_attn"], bias="all")),
    "gpt2-bias-lora-only": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only")),
    "gpt2-embedding": ("gpt2", dict(r=4, target_modules=["wte", "c_proj"])),
    "gpt2-default-targets": ("gpt2", dict(r=4)),
}


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    return CASES[request.param]


def test_ours_saved_loads_in_peft(case, tmp_path):
    arch, kwargs = case
    ours = da.inject(MODELS[arch](), da.LoraConfig(**kwargs))
    randomize_trainable(ours)
    expected = logits(ours)
    da.save_adapter(ours, str(tmp_path))
    theirs = PeftModel.from_pretrained(MODELS[arch](), str(tmp_path))
    assert max_diff(logits(theirs), expected) <= LOGITS_TOL
    assert max_diff(logits(theirs), logits(MODELS[arch]())) > 1e-3  # the adapter really changes the output


def test_peft_saved_loads_in_ours(case, tmp_path):
    arch, kwargs = case
    theirs = get_peft_model(MODELS[arch](), PeftLoraConfig(**kwargs))
    randomize_trainable(theirs, seed=7)
    theirs.save_pretrained(str(tmp_path))
    ours = da.load_adapter(MODELS[arch](), str(tmp_path))
    assert max_diff(logits(ours), logits(theirs)) <= LOGITS_TOL
    assert max_diff(logits(ours), logits(MODELS[arch]())) > 1e-3


def test_trainable_parameter_count_equals_peft(case):
    arch, kwargs = case
    ours = da.inject(MODELS[arch](), da.LoraConfig(**kwargs))
    theirs = get_peft_model(MODELS[arch](), PeftLoraConfig(**kwargs))
    assert trainable_count(ours) == trainable_count(theirs) > 0
    # and exactly peft's keys (embedding base weights aside, which peft adds on save only)
    peft_keys = get_peft_model_state_dict(theirs, save_embedding_layers=False)
    assert sorted(da.adapter_state_dict(ours)) == sorted(peft_keys)


def test_non_default_adapter_saved_in_subfolder_as_peft(tmp_path):
    ours = da.inject(MODELS["llama"](), da.LoraConfig(r=4, target_modules=["q_proj"]))
    da.inject(ours, da.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="other")
    da.set_adapter(ours, "other")
    randomize_trainable(ours)
    expected = logits(ours)
    out = da.save_adapter(ours, str(tmp_path), adapter_name="other")
    assert out == str(tmp_path / "other") and (tmp_path / "other" / "adapter_model.safetensors").is_file()
    theirs = PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path / "other"), adapter_name="other")
    assert max_diff(logits(theirs), expected) <= LOGITS_TOL
    # and peft's own subfolder layout reads back into ours by adapter name
    theirs.save_pretrained(str(tmp_path / "peft"), selected_adapters=["other"])
    assert (tmp_path / "peft" / "other" / "adapter_config.json").is_file()
    back = da.load_adapter(MODELS["llama"](), str(tmp_path / "peft"), adapter_name="other")
    da.set_adapter(back, "other")
    assert max_diff(logits(back), expected) <= LOGITS_TOL


def test_adapter_model_bin_read_with_weights_only(tmp_path):
    theirs = get_peft_model(MODELS["llama"](), PeftLoraConfig(r=4, target_modules=["q_proj"]))
    randomize_trainable(theirs)
    theirs.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    ours = da.load_adapter(MODELS["llama"](), str(tmp_path))
    assert max_diff(logits(ours), logits(theirs)) <= LOGITS_TOL


def test_trained_adapter_roundtrip_through_peft_after_training(tmp_path):
    """A few real optimizer steps (not only random weights): peft reproduces the trained model."""
    model = da.inject(MODELS["llama"](), da.LoraConfig(r=4, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    da.save_adapter(model, str(tmp_path))
    theirs = PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path))
    assert max_diff(logits(theirs), logits(model)) <= LOGITS_TOL


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_mode_of_the_umask(tmp_path, umask, mode):
    """Atomic writes (temporary file + rename) must not keep mkstemp's private 0600: a serving
    process running as another user reads the adapter (issue 17, rule 6). Checked for the adapter
    files, a consolidated copy of them, and a text file written through the same helper."""
    import os
    import stat

    from dist_adapters.checkpoint.atomic import atomic_write_text
    from dist_adapters.checkpoint.consolidate import consolidate
    from helpers import tiny_llama

    old = os.umask(umask)
    try:
        model = da.inject(tiny_llama(), da.LoraConfig(r=2, target_modules=["q_proj"]))
        da.save_adapter(model, str(tmp_path / "adapter"))
        consolidate(str(tmp_path / "adapter"), str(tmp_path / "copy"))
        atomic_write_text(str(tmp_path / "notes.txt"), "x\n")
    finally:
        os.umask(old)
    written = [tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "adapter" / "adapter_config.json",
               tmp_path / "copy" / "adapter_model.safetensors", tmp_path / "copy" / "adapter_config.json",
               tmp_path / "notes.txt"]
    got = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert got == {name: oct(mode) for name in got} and len(got) == 5


def _fsdp2_class_swap(model):
    """What fully_shard does to the model's class (a generated ``FSDP<Model>`` subclass), without
    a process group: the class name and module an adapter config must not record."""
    from torch.distributed.fsdp import FSDPModule

    generated = type(f"FSDP{type(model).__name__}", (FSDPModule, type(model)), {})
    generated.__module__ = "torch.distributed.fsdp._fully_shard._fsdp_init"
    model.__class__ = generated
    return model


@pytest.mark.parametrize("wrap", ["compiled", "checkpoint-wrapped", "fsdp2-class", "compiled-fsdp2-class"])
def test_auto_peft_model_loads_what_a_wrapped_model_saved(wrap, tmp_path):
    """adapter_config.json names the base model's own class, whatever wraps it (issue 17, rule 2):
    peft's AutoPeftModelForCausalLM imports that class to load the base. The recipe's runs under
    every strategy are checked by recipe_helpers.assert_peft_reproduces."""
    import json

    from peft import AutoPeftModelForCausalLM
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from helpers import tiny_llama

    tiny_llama().save_pretrained(str(tmp_path / "base"))
    model = da.inject(tiny_llama(), da.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                  base_model_name_or_path=str(tmp_path / "base")))
    randomize_trainable(model)
    expected = logits(model)
    wrapped = {"compiled": lambda m: torch.compile(m), "checkpoint-wrapped": checkpoint_wrapper,
               "fsdp2-class": _fsdp2_class_swap,
               "compiled-fsdp2-class": lambda m: torch.compile(_fsdp2_class_swap(m))}[wrap](model)
    assert type(wrapped).__name__ != "LlamaForCausalLM"
    da.save_adapter(wrapped, str(tmp_path / "adapter"))
    mapping = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping == {"base_model_class": "LlamaForCausalLM",
                       "parent_library": "transformers.models.llama.modeling_llama"}
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    assert max_diff(logits(loaded), expected) <= LOGITS_TOL
