"""``dist-adapters verify``: does a saved adapter reproduce the model that trained it?

    dist-adapters verify RUN_DIR | CHECKPOINT_DIR | ADAPTER_DIR [--base BASE_DIR] [--atol X] [--target vllm]

Reads ``verification.json`` (checkpoint/verification.py), checks every tensor's sha256 against
it, then loads the base and the adapter in this one process, reruns the recorded probe batch and
compares the logits with what the live (sharded) model gave at save time. Exit 0 with a one-line
summary; exit 1 naming the first thing that differs (a key, or the logits); exit 2 for input it
cannot read (no verification.json, no base).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

# logits tolerance (absolute, times max(1, the logits' RMS)) by the dtype the base ran in: a
# single process against the sharded engines' reduction orders (fp32: measured <= 1e-5 on the
# suite's strategies, tests/test_verify.py)
TOLERANCE = {"float32": 1e-4, "float64": 1e-8, "bfloat16": 5e-2, "float16": 1e-2}


class VerifyFailure(Exception):
    """The adapter does not reproduce its record (exit 1)."""


def _adapter_dir(path: str) -> tuple[str, Optional[str]]:
    """(the adapter directory, the run directory or None) for a run, a checkpoint or an adapter."""
    from .config import CONFIG_NAME

    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path, None
    if os.path.isfile(os.path.join(path, "adapter", CONFIG_NAME)):
        from .checkpoint.manifest import check_files

        check_files(path)  # a checkpoints/step_N: every file as written
        return os.path.join(path, "adapter"), path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such directory")
    raise FileNotFoundError(f"{path}: not a run, checkpoint or PEFT adapter directory (no {CONFIG_NAME} in it or "
                            "in its adapter/)")


def check_tensors(adapter: str, record: dict) -> int:
    """Every tensor of the adapter against the record's sha256; the count checked."""
    from .checkpoint.allow_list import CheckpointError
    from .checkpoint.manifest import first_difference
    from .checkpoint.peft_format import read_adapter_weights

    try:
        tensors, file = read_adapter_weights(adapter)  # the file's own manifest first
    except CheckpointError as exc:
        raise VerifyFailure(str(exc)) from None
    found = first_difference(tensors, record["tensors"])
    if found is not None:
        key, what = found
        shape = f" (shape {list(tensors[key].shape)})" if key in tensors else ""
        raise VerifyFailure(f"{file}: tensor {key!r}{shape} " + {
            "missing": "was saved but is missing", "unrecorded": "was not in the saved adapter",
            "changed": "differs from the one saved (sha256)"}[what])
    return len(record["tensors"])


def _load_base(base: str, record: dict, run_dir: Optional[str]):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, record.get("base_dtype") or "float32")
    recipe = os.path.join(run_dir or "", "recipe.json")
    if record.get("quantization"):
        from .recipe import quantization

        if run_dir and os.path.isfile(recipe):  # the recipe's own loading, settings and all
            with open(recipe, encoding="utf-8") as fh:
                cfg = json.load(fh)
            return quantization.load_quantized(base, quantization.settings(cfg), dtype, torch.device("cpu"))
        from transformers import BitsAndBytesConfig

        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": "cpu"},
                                                    quantization_config=BitsAndBytesConfig.from_dict(
                                                        record["quantization"]))
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)


def compare_logits(logits, record: dict, atol: Optional[float]) -> tuple[float, float]:
    """(max |diff| over the samples, relative diff of the sum of squares); VerifyFailure past tol."""
    from .checkpoint.verification import logits_record

    want, got = record["logits"], logits_record(logits)
    if got["shape"] != want["shape"]:
        raise VerifyFailure(f"probe logits have shape {got['shape']}, the live model's had {want['shape']}")
    numel = math.prod(want["shape"])
    rms = math.sqrt(max(want["sum_sq"], 0.0) / numel)
    if atol is None:  # the coarser of the base's dtype and the logits' (FSDP mixed precision computes in bf16)
        atol = max(TOLERANCE.get(record.get("base_dtype") or "float32", 1e-4), TOLERANCE.get(want["dtype"], 1e-4))
    tol = atol * max(1.0, rms)
    diffs = [abs(a - b) for a, b in zip(got["samples"], want["samples"])]
    worst = max(diffs)
    rel_sq = abs(got["sum_sq"] - want["sum_sq"]) / max(want["sum_sq"], 1e-30)
    if worst > tol or rel_sq > 4 * tol or abs(got["sum"] - want["sum"]) > tol * numel:
        i = diffs.index(worst)
        raise VerifyFailure(f"probe logits differ from the live model's at save time: sample {i} is "
                            f"{got['samples'][i]:.6g}, was {want['samples'][i]:.6g} (|diff| {worst:.3g}, tol "
                            f"{tol:.3g}); sum of squares {got['sum_sq']:.6g} vs {want['sum_sq']:.6g}: the saved "
                            "adapter does not reproduce the model that trained it")
    return worst, rel_sq


def verify(path: str, base: Optional[str] = None, atol: Optional[float] = None, target: Optional[str] = None,
           max_lora_rank: Optional[int] = None) -> str:
    """The one-line summary; VerifyFailure when something differs (or, with ``target``, what that
    serving engine would not accept: checkpoint/serving.py)."""
    from .checkpoint.verification import read

    adapter, run_dir = _adapter_dir(path)
    record = read(adapter)
    count = check_tensors(adapter, record)
    if target is not None:
        from .checkpoint import serving
        from .config import CONFIG_NAME

        with open(os.path.join(adapter, CONFIG_NAME), encoding="utf-8") as fh:
            config = json.load(fh)
        found = serving.problems(target, config, record["tensors"], max_lora_rank)
        if found:
            raise VerifyFailure(f"--target {target}: " + "; ".join(f"({i}) {p}" for i, p in enumerate(found, 1)))
    where = f"saved under {record.get('engine')} on {record.get('world_size')} rank(s)"
    if "probe" not in record:
        return f"{count} tensors match their sha256; no probe was recorded ({where}), logits not checked"
    base = base or record.get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{adapter}: the record names no base model: pass --base BASE_DIR")
    if not os.path.isdir(base):
        raise FileNotFoundError(f"base model {base!r} is not a directory: pass --base BASE_DIR")
    import torch
    from transformers.utils import logging as hf_logging

    from .checkpoint.peft_format import load_adapter

    hf_logging.disable_progress_bar()  # the summary is the output
    model = load_adapter(_load_base(base, record, run_dir), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(record["probe"]["input_ids"])).logits
    worst, rel_sq = compare_logits(logits, record, atol)
    return (f"{count} tensors match their sha256; probe logits {record['logits']['shape']} match the live model "
            f"(max |diff| {worst:.2g} over {len(record['logits']['samples'])} samples, sum of squares rel. "
            f"{rel_sq:.1g}); {where}")


def verify_converted(out: str, src: str, base: Optional[str], fmt: str) -> str:
    """``consolidate --verify``: check OUT against the base in this process. A source of ours
    carries the live model's record (``verification.json`` in its adapter directory): OUT must
    reproduce it. Any other source has none: OUT must load onto the base (every key a module of
    it, every shape its shape), give finite logits on the probe and change them (an all-zero
    adapter, such as an empty ZeRO-3 gather, changes nothing); its own record is then written
    so that ``verify OUT`` reproduces this conversion later."""
    import shutil

    import torch

    from .checkpoint.peft_format import read_adapter_weights
    from .checkpoint.verification import VERIFICATION_NAME, probe_ids, record, write

    theirs = next((os.path.join(d, VERIFICATION_NAME) for d in (src, os.path.join(src, "adapter"))
                   if os.path.isfile(os.path.join(d, VERIFICATION_NAME))), None)
    if theirs is not None:
        shutil.copyfile(theirs, os.path.join(out, VERIFICATION_NAME))
        return verify(out, base)
    base = base or _config_base(out)
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"--verify needs the base model: pass --base BASE_DIR (got {base!r})")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .checkpoint.peft_format import load_adapter
    from .control import disabled

    hf_logging.disable_progress_bar()
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base), out).eval()
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with disabled(model):
            plain = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise VerifyFailure(f"{out}: the adapter gives non-finite logits on the probe")
    change = (logits - plain).abs().max().item()
    if change == 0.0:
        raise VerifyFailure(f"{out}: the adapter does not change the base model's logits at all (every lora_B "
                            "zero: an empty or never-trained adapter?)")
    tensors, _ = read_adapter_weights(out)

    write(out, record(model, tensors, engine=f"consolidated from {fmt}", base_model=base))  # the save's format
    return (f"{len(tensors)} tensors load onto {base}; the probe's logits are finite and move by up to {change:.3g} "
            f"from the base; recorded in {os.path.join(out, VERIFICATION_NAME)} (no live-model record in {fmt})")


def _config_base(out: str) -> Optional[str]:
    from .config import CONFIG_NAME

    with open(os.path.join(out, CONFIG_NAME), encoding="utf-8") as fh:
        return json.load(fh).get("base_model_name_or_path")
