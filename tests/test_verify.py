"""Issue 22: ``dist-adapters verify``. Every save records verification.json (each tensor's sha256
and the live model's logits on a fixed probe); verify reruns the probe in a fresh process.

It passes on every recipe output of the suite's strategies: tests/equivalence.py's
``assert_equivalent`` verifies each run it compares (none, ddp, fsdp1, fsdp2, zero1-3, tp,
fsdp2_tp, hf_tp, ep, fsdp2_ep, QLoRA, DoRA, PiSSA ...). Here: the CLI on the single-process run
(under 10 s), four tamperings of the file each named by key, and a save that wrote wrong numbers
consistently (hashes rewritten to match: the ZeRO-3 "empty adapter" case), which only the
probe's logits can see."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_adapters.checkpoint.manifest import tensor_manifest, tensor_sha256
from recipe_helpers import cli

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


def _verify(path, *extra):
    return cli("verify", str(path), *extra)


def test_verify_a_run_a_checkpoint_and_an_adapter_with_its_base(single_run, tmp_path):
    t0 = time.perf_counter()
    res = _verify(single_run)
    seconds = time.perf_counter() - t0
    print(f"verify of the built-in model's run: {seconds:.1f} s: {res.stdout.strip()}")
    assert res.returncode == 0 and res.stdout.startswith("dist-adapters verify: OK: "), res.stderr[-2000:]
    assert "match the live model" in res.stdout and len(res.stdout.strip().splitlines()) == 1
    assert seconds < 10  # acceptance: under 10 s on the built-in model (measured ~5 s, mostly imports)
    assert _verify(single_run / "checkpoints" / "step_2").returncode == 0
    shutil.copytree(single_run / "adapter", tmp_path / "adapter")
    res = _verify(tmp_path / "adapter", "--base", str(single_run / "base_model"))
    assert res.returncode == 0, res.stderr[-2000:]


def _tampered(single_run, tmp_path, change) -> str:
    """A copy of the run's adapter whose tensors ``change`` edits, re-saved as a user's script
    would (safetensors without our metadata); verify's stderr."""
    adapter = tmp_path / "adapter"
    shutil.copytree(single_run / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, adapter / "adapter_model.safetensors")
    res = _verify(adapter, "--base", str(single_run / "base_model"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, (res.returncode, res.stderr[-2000:])
    assert res.stderr.startswith("dist-adapters verify: FAILED: ") and len(res.stderr.strip().splitlines()) == 1
    return res.stderr


def _edit(t):
    t[KEY.format("B")][0, 0] += 1e-3


def _empty(t):
    t[KEY.format("B")] = torch.empty(0)


def _swap(t):
    t[KEY.format("A")], t[KEY.format("B")] = t[KEY.format("B")], t[KEY.format("A")]


def _foreign_shard(t):  # rank 1's rows where rank 0's belong
    a = t[KEY.format("A")]
    half = a.shape[0] // 2
    t[KEY.format("A")] = torch.cat([a[half:], a[half:]])


@pytest.mark.parametrize("change", [_edit, _empty, _swap, _foreign_shard], ids=["edit", "empty", "swap", "shard"])
def test_each_tampering_is_named_by_key(single_run, tmp_path, change):
    err = _tampered(single_run, tmp_path, change)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_" in err and "differs" in err, err


def test_a_save_that_wrote_wrong_numbers_fails_on_the_logits(single_run, tmp_path):
    """lora_B of one module saved as zeros (what an empty ZeRO-3 gather gives), the record's and
    the file's hashes written to match: only the probe can tell."""
    adapter = tmp_path / "adapter"
    shutil.copytree(single_run / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[KEY.format("B")] = torch.zeros_like(tensors[KEY.format("B")])
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt", **tensor_manifest(tensors)})
    record = json.loads((adapter / "verification.json").read_text())
    record["tensors"][KEY.format("B")] = tensor_sha256(tensors[KEY.format("B")])
    (adapter / "verification.json").write_text(json.dumps(record))
    res = _verify(adapter)
    assert res.returncode == 1 and "probe logits differ" in res.stderr, res.stderr[-2000:]


def test_unverifiable_input_is_exit_2(single_run, tmp_path):
    shutil.copytree(single_run / "adapter", tmp_path / "adapter")
    (tmp_path / "adapter" / "verification.json").unlink()
    res = _verify(tmp_path / "adapter")
    assert res.returncode == 2 and "verification.json: missing" in res.stderr, res.stderr
    res = _verify(single_run / "adapter", "--base", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "nowhere" in res.stderr and "--base" in res.stderr, res.stderr
