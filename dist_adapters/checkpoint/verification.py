"""``adapter/verification.json``: what a saved adapter must reproduce (issue 22).

At every collective save (``save_adapter``), the live model, sharded as it trained, runs a fixed
probe batch; rank 0 records, next to the PEFT files (peft ignores the extra file):

    format           1
    probe            input_ids of the probe ([2, 16], fixed, below the vocabulary size)
    logits           shape, dtype, sum and sum of squares (float64), and 32 values at fixed
                     positions of the live model's logits
    tensors          {key: sha256} of every tensor written (checkpoint/manifest.py)
    world_size, engine, base_model_name_or_path, base_dtype, quantization

``dist-adapters verify`` (verify_cmd.py) loads the base and the adapter in a fresh single process,
reruns the probe and compares: hashes exactly, logits within a tolerance. A save that wrote the
wrong numbers (an empty ZeRO-3 gather, one rank's shard) has matching hashes but other logits.

The probe runs through the module whose forward does the engine's gathering: the model as
given, but inside DDP / DataParallel / DeepSpeedEngine (``names.FORWARD_THROUGH_MODULE``), whose
own forward adds only gradient bookkeeping. A model without ``config.vocab_size`` (not a
language model) gets the tensors' record without a probe.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from torch import nn

from ..control import unwrap
from ..names import FORWARD_THROUGH_MODULE
from .atomic import atomic_write_text
from .manifest import tensor_sha256

VERIFICATION_NAME = "verification.json"
PROBE_SHAPE = (2, 16)
SAMPLES = 32


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed batch of token ids spread over the vocabulary (no randomness: any process, any
    version rebuilds it from the recorded list anyway)."""
    n = PROBE_SHAPE[0] * PROBE_SHAPE[1]
    return ((torch.arange(n, dtype=torch.long) * 7919 + 13) % vocab_size).reshape(PROBE_SHAPE)


def sample_positions(numel: int) -> list[int]:
    step = max(1, numel // SAMPLES)
    return [min(numel - 1, i * step + (i * 37) % step) for i in range(SAMPLES)]


def logits_record(logits: torch.Tensor) -> dict:
    flat = logits.detach().to("cpu", torch.float64).reshape(-1)
    return {"shape": list(logits.shape), "dtype": str(logits.dtype).removeprefix("torch."),
            "sum": flat.sum().item(), "sum_sq": flat.pow(2).sum().item(),
            "samples": [flat[i].item() for i in sample_positions(flat.numel())]}


def _forward_module(model: nn.Module) -> nn.Module:
    while type(model).__name__ in FORWARD_THROUGH_MODULE and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def engine_name(model: nn.Module) -> str:
    """How ``model`` is held, for the record (the recipe passes its strategy name instead)."""
    kind = type(model).__name__
    if kind == "DeepSpeedEngine":
        return f"DeepSpeed ZeRO-{model.zero_optimization_stage()}"
    if kind in FORWARD_THROUGH_MODULE or kind == "FullyShardedDataParallel":
        return kind
    if type(unwrap(model)).__module__.startswith("torch.distributed.fsdp"):
        return "FSDP2"
    if any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters()):
        return "DTensor"
    return "none"


@torch.no_grad()
def probe_logits(model: nn.Module) -> Optional[torch.Tensor]:
    """The probe's logits from the live model (collective where its forward is), in eval mode;
    the previous train / eval mode of every module is restored. None for a model without a
    vocabulary."""
    config = getattr(unwrap(model), "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    module = _forward_module(model)
    modes = {m: m.training for m in module.modules()}
    param = next(unwrap(model).parameters(), None)
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    if device.type == "cpu" and torch.cuda.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())  # ZeRO-3 partitions may sit on the host
    module.eval()
    try:
        out = module(input_ids=probe_ids(vocab).to(device))
    finally:
        for m, training in modes.items():
            m.training = training
    logits = getattr(out, "logits", out[0] if isinstance(out, tuple) else out)
    if type(logits).__name__ == "DTensor":
        logits = logits.full_tensor()
    return logits


def _quantization(model: nn.Module) -> Optional[dict]:
    q = getattr(getattr(unwrap(model), "config", None), "quantization_config", None)
    if q is None:
        return None
    return q.to_dict() if hasattr(q, "to_dict") else dict(q)


def record(model: nn.Module, tensors: dict[str, Any], engine: Optional[str] = None, probe: bool = True,
           base_model: Optional[str] = None) -> dict:
    """The verification record of a save (every rank runs the probe; it may be collective)."""
    import torch.distributed as dist

    logits = probe_logits(model) if probe else None
    dtype = getattr(unwrap(model), "dtype", None)  # transformers: the first floating parameter's
    out = {"format": 1, "tensors": {k: tensor_sha256(v) for k, v in sorted(tensors.items())},
           "world_size": dist.get_world_size() if dist.is_initialized() else 1,
           "engine": engine or engine_name(model), "base_model_name_or_path": base_model,
           "base_dtype": str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None,
           "quantization": _quantization(model)}
    if logits is not None:
        vocab = unwrap(model).config.vocab_size
        out["probe"] = {"input_ids": probe_ids(vocab).tolist()}
        out["logits"] = logits_record(logits)
    return out


def write(out_dir: str, data: dict) -> None:
    atomic_write_text(os.path.join(out_dir, VERIFICATION_NAME), json.dumps(data, indent=1) + "\n")


def read(directory: str) -> dict:
    path = os.path.join(directory, VERIFICATION_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (adapters saved by dist-adapters record it; this one was "
                                "written by another tool or an older version)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("tensors"), dict):
        raise ValueError(f"{path}: not a verification record (format 1 with 'tensors')")
    return data
