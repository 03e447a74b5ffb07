"""Issue 22: what we write carries checksums, and every reader of ours checks them
(dist_adapters/checkpoint/manifest.py): each tensor's sha256 in the adapter's safetensors
metadata, each file's sha256 in checkpoints/step_N/manifest.json. A changed byte is a one-line
error naming the key or file; an unchanged copy still loads, in peft too."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from safetensors import safe_open

import dist_adapters as da
from dist_adapters.checkpoint.allow_list import CheckpointError
from dist_adapters.checkpoint.manifest import MANIFEST_NAME, TENSOR_SHA_KEY, tensor_sha256
from helpers import tiny_llama
from recipe_helpers import cli, config


def flip_tensor_byte(path, key: str, at: int = 1) -> None:
    """Flip one bit of ``key``'s data in a safetensors file, leaving its header as it is."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin, _ = json.loads(raw[8:8 + n])[key]["data_offsets"]
    raw[8 + n + begin + at] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture
def saved(tmp_path):
    model = da.inject(tiny_llama(), da.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    da.save_adapter(model, str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def test_saved_adapter_records_every_tensor_sha256(saved):
    with safe_open(str(saved / "adapter_model.safetensors"), framework="pt") as fh:
        recorded = json.loads(fh.metadata()[TENSOR_SHA_KEY])
        assert sorted(recorded) == sorted(fh.keys()) and len(recorded) == 12  # 3 layers x 2 modules x A, B
        assert all(recorded[k] == tensor_sha256(fh.get_tensor(k)) for k in fh.keys())
    da.load_adapter(da.inject(tiny_llama(), da.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), str(saved))


def test_a_flipped_byte_in_an_adapter_is_named_by_load_and_consolidate(saved, tmp_path):
    from peft import PeftModel

    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    flip_tensor_byte(saved / "adapter_model.safetensors", key)
    PeftModel.from_pretrained(tiny_llama(), str(saved))  # peft has no checksum: it loads the changed value
    with pytest.raises(CheckpointError, match=f"tensor '{key}' does not match its recorded sha256"):
        da.load_adapter(tiny_llama(), str(saved))
    res = cli("consolidate", str(saved), str(tmp_path / "out"))
    assert res.returncode == 2 and key in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out").exists()


def test_a_changed_recipe_checkpoint_is_refused_by_resume_and_consolidate(single_run, tmp_path):
    from dist_adapters.recipe.train import train

    step = tmp_path / "step_2"
    shutil.copytree(single_run / "checkpoints" / "step_2", step)
    recorded = json.loads((step / MANIFEST_NAME).read_text())["files"]
    assert {"optimizer.pt", "trainer_state.json", "rng_rank0.pt", "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json"} <= set(recorded)
    raw = bytearray((step / "optimizer.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (step / "optimizer.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="optimizer.pt: does not match its sha256 in manifest.json"):
        train(config(tmp_path / "resumed", **{"train.resume_from": str(step)}))
    res = cli("consolidate", str(step), str(tmp_path / "out"))
    assert res.returncode == 2 and "optimizer.pt" in res.stderr and "manifest.json" in res.stderr, res.stderr
    (step / "optimizer.pt").write_bytes(bytes(raw[:-5]))  # a torn copy
    (step / "notes.txt").write_text("added later")
    with pytest.raises(CheckpointError, match="notes.txt: not listed in manifest.json"):
        train(config(tmp_path / "resumed2", **{"train.resume_from": str(step)}))
