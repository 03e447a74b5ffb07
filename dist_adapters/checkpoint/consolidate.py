"""Any sharded training checkpoint -> a PEFT adapter directory (``dist-adapters consolidate``),
and what a checkpoint holds (``dist-adapters inspect``).

    open_source(SRC)   detects the format and returns a reader (zero_reader, dcp_reader,
                       small_readers): tensor names and shapes up front, one tensor read at a time
    AdapterKeys        picks the adapter's tensors and maps their names to peft's keys (keys.py)
    find_config        adapter_config.json from --config, next to the checkpoint or its run
                       directory; else inferred from the shapes, and only with a known
                       lora_alpha (--lora-alpha) or an explicit --guess-alpha: the scaling
                       alpha / r is in no tensor, and a guess makes a different model
    check_shapes       lora_A [r, in], lora_B [out, r], nothing empty, token rows = indices
    consolidate        reads the adapter tensors one by one (a progress bar), converts the
                       dtype, splits fused projections, and writes OUT atomically: the weights
                       file first, adapter_config.json last. SRC is only read.

Peak memory is the adapter plus one tensor: the readers map files instead of loading them and
touch only the adapter's slices. A DeepSpeed checkpoint is read and written without importing
torch (torch_zip; arrays are numpy); the other readers use torch, imported when needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from collections import Counter
from typing import Any, Optional

import numpy as np

from ..config import CONFIG_NAME, LoraConfig, TrainableTokensConfig, config_from_dict, get_pattern_key, load_config
from .allow_list import CheckpointError
from .atomic import atomic_path
from . import serving
from .manifest import check_files, tensor_manifest
from ..names import PREFIX, WEIGHTS_NAME, module_of
from .keys import AdapterKeys
from .rank_files_reader import RankFilesCheckpoint, find_rank_files
from .zero_reader import ZeroCheckpoint, is_zero_dir

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def open_source(path: str, tag: Optional[str] = None, base: Optional[str] = None):
    """The reader for ``path``; the checks run in order of how specific a layout is. ``base``:
    the HF base model directory, which a torchtitan checkpoint needs (torchtitan_reader)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        check_files(path)  # a directory we wrote (checkpoints/step_N): every file's sha256
    if os.path.isdir(path) and (is_zero_dir(path) or (tag is not None and is_zero_dir(os.path.join(path, tag)))):
        return ZeroCheckpoint(path, tag)  # first: it needs no torch
    from .small_readers import FileSource, MegatronSource, PeftDirSource, is_megatron_dir, is_peft_dir

    if os.path.isfile(path):
        return FileSource(path)
    if is_peft_dir(path):
        return PeftDirSource(path)
    if is_peft_dir(os.path.join(path, "adapter")):  # a dist-adapters run or checkpoints/step_N
        return PeftDirSource(os.path.join(path, "adapter"))
    if is_megatron_dir(path):
        return MegatronSource(path)
    files = find_rank_files(path)
    if files:
        return RankFilesCheckpoint(path, files)
    from .bridge_reader import BridgeSource, bridge_iteration_dir
    from .dcp_reader import DcpCheckpoint, find_dcp_dir  # imports torch

    bridge = bridge_iteration_dir(path)
    if bridge is not None:
        return BridgeSource(DcpCheckpoint(bridge))
    dcp = find_dcp_dir(path)
    if dcp is not None:
        return _dcp_source(DcpCheckpoint(dcp), base)
    for name in ("pytorch_model_fsdp.bin", "adapter_model.safetensors", "model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return FileSource(os.path.join(path, name))
    raise CheckpointError(f"{path}: not a checkpoint this tool reads: expected a DeepSpeed directory ('latest' "
                          "or *_optim_states.pt), a DCP directory (.metadata, or accelerate's pytorch_model_fsdp_0/), "
                          "FSDP1 per-rank files (*_rank0.bin ...), Megatron shards (mp_rank_00/shards.json), "
                          "a Megatron-Bridge run (latest_checkpointed_iteration.txt, iter_N/run_config.yaml), "
                          "a PEFT directory, or a state-dict file")


def _dcp_source(dcp, base: Optional[str]):
    """A DCP directory holds our (or FSDP's, accelerate's) names, or torchtitan's (its own reader;
    a Megatron-Bridge run is recognised before, by its tracker or run_config.yaml)."""
    from .torchtitan_reader import TorchtitanSource, is_torchtitan_lora

    if is_torchtitan_lora(dcp.names):
        return TorchtitanSource(dcp, base)
    return dcp


# ------------------------------------------------------------------------------- config
def _candidates(src: str, source) -> list[str]:
    seen, out = set(), []
    for start in (getattr(source, "dir", src), src):
        d = start if os.path.isdir(start) else os.path.dirname(start)
        for _ in range(4):  # the checkpoint dir, its tag's parent, the run dir ...
            for cand in (d, os.path.join(d, "adapter")):
                path = os.path.join(cand, CONFIG_NAME)
                if os.path.isfile(path) and path not in seen:
                    seen.add(path)
                    out.append(path)
            d = os.path.dirname(os.path.abspath(d))
    return out


def infer_config(shapes: dict[str, tuple], with_lora: bool, warn, lora_alpha: Optional[float] = None,
                 guess_alpha: bool = False) -> LoraConfig:
    """A LoraConfig from the adapter's shapes: r (the most common rank), rank_pattern for the
    modules that differ, target_modules (the modules' last names), modules_to_save. lora_alpha
    is in no tensor: it is ``lora_alpha``, or r with ``guess_alpha``; else this refuses."""
    ranks, targets, saved, tokens = {}, set(), set(), []
    for key, shape in shapes.items():
        module = module_of(key)
        if key.endswith((".lora_A.weight", ".lora_embedding_A")):
            ranks[module] = shape[0]
            targets.add(module.rsplit(".", 1)[-1])
        elif key.endswith("trainable_tokens_delta"):
            tokens.append(module)
        elif not key.endswith((".lora_B.weight", ".lora_embedding_B")):
            saved.add(module_of(key).rsplit(".", 1)[0])
    if tokens:
        raise CheckpointError(f"the checkpoint has trainable tokens for {sorted(tokens)}, and their token indices "
                              f"cannot be inferred from shapes: pass --config with the run's {CONFIG_NAME}")
    if not with_lora:
        raise CheckpointError(f"no LoRA tensors to infer a config from: pass --config with the run's {CONFIG_NAME}")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: v for m, v in sorted(ranks.items()) if v != r}
    if lora_alpha is None and not guess_alpha:
        raise CheckpointError(f"no {CONFIG_NAME} found next to the checkpoint or in its run directory, and "
                              f"lora_alpha (the scaling alpha/r) is in no tensor: pass --config with the run's "
                              f"{CONFIG_NAME}, or --lora-alpha A, or --guess-alpha to write lora_alpha = r = {r}")
    alpha = r if lora_alpha is None else lora_alpha
    warn(f"no {CONFIG_NAME} found: inferred r={r}, target_modules={sorted(targets)}"
         + (f", rank_pattern for {len(pattern)} modules" if pattern else "")
         + (f"; lora_alpha={alpha} from --lora-alpha" if lora_alpha is not None else
            f"; lora_alpha GUESSED as r={r} (--guess-alpha): the scaling may differ from training"))
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(targets), rank_pattern=pattern,
                      modules_to_save=sorted(saved) or None)


def find_config(src: str, source, given: Optional[str], shapes: dict, with_lora: bool, warn,
                lora_alpha: Optional[float] = None, guess_alpha: bool = False):
    """(config, where it came from)."""
    config, origin = _found_config(src, source, given)
    if config is None:
        return infer_config(shapes, with_lora, warn, lora_alpha, guess_alpha), "inferred from shapes"
    if lora_alpha is not None and lora_alpha != config.lora_alpha:
        raise CheckpointError(f"--lora-alpha {lora_alpha} is for checkpoints without a config, and {origin} "
                              f"says lora_alpha={config.lora_alpha}: drop --lora-alpha or pass another --config")
    return config, origin


def _found_config(src: str, source, given: Optional[str]):
    if given:
        path = os.path.join(given, CONFIG_NAME) if os.path.isdir(given) else given
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config {given}: no such file")
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return config_from_dict(data, source=path), path
    if hasattr(source, "own_config"):  # a format that records its adapter's settings (Megatron-Bridge)
        return source.own_config()
    found = _candidates(src, source)
    if found:
        return load_config(os.path.dirname(found[0])), found[0]
    return None, None


# ------------------------------------------------------------------------------- checks
def _rank_for(config: LoraConfig, module: str) -> int:
    return config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)


def _token_count(config, module: str) -> Optional[int]:
    indices = config.token_indices if isinstance(config, TrainableTokensConfig) else config.trainable_token_indices
    if isinstance(indices, dict):
        for name, idx in indices.items():
            if module == name or module.endswith("." + name):
                return len(idx)
        return None
    return len(indices) if indices else None


def _convert(t: Any, dtype: str) -> Any:
    """numpy arrays stay numpy for fp32 / fp16; bf16 (which numpy lacks) goes through torch."""
    if isinstance(t, np.ndarray):
        if dtype != "bfloat16":
            return t.astype(dtype)
        import torch

        t = torch.from_numpy(t)
    import torch

    return t.to(getattr(torch, dtype))


def _copy(t: Any) -> Any:
    return np.array(t) if isinstance(t, np.ndarray) else t.contiguous().clone()


def _nbytes(t: Any) -> int:
    return t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def _save(tensors: dict, path: str) -> None:
    """safetensors, without torch when every tensor is a numpy array."""
    tensors = dict(sorted(tensors.items()))
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file

        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(arrays, path, metadata={"format": "pt", **tensor_manifest(arrays)})
        return
    import torch
    from safetensors.torch import save_file

    plain = {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v.contiguous()
             for k, v in tensors.items()}
    save_file(plain, path, metadata={"format": "pt", **tensor_manifest(plain)})


def _expert_rank(config, rank_dim) -> bool:
    """An expert factor of ``target_parameters`` stacks E experts' ranks: [E*r, in] / [out, r*E]
    (which parameter a nested key belongs to depends on the model, so any configured r may apply)."""
    ranks = {config.r, *config.rank_pattern.values()}
    return bool(config.target_parameters) and rank_dim is not None and any(rank_dim % r == 0 for r in ranks)


def check_shapes(tensors: dict, config, origin: str) -> None:
    """lora_A [r, in] / lora_B [out, r] with r of the config, A and B agreeing, token rows
    matching the indices; errors name the key and the config file."""
    for key, t in tensors.items():
        if math.prod(t.shape) == 0:
            raise CheckpointError(f"key {key!r} is empty (shape {tuple(t.shape)}): a ZeRO-3 parameter saved "
                                  "without gathering? Consolidate the optimizer-state checkpoint instead")
        module = module_of(key)
        if key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")):
            if not isinstance(config, LoraConfig):
                raise CheckpointError(f"key {key!r} is a LoRA factor but {origin} is not a LoRA config")
            r = _rank_for(config, module)
            is_a = key.endswith(("lora_A.weight", "lora_embedding_A"))
            rank_dim = t.shape[0 if is_a else 1] if len(t.shape) == 2 else None
            if rank_dim != r and not _expert_rank(config, rank_dim):
                want = "[r, in]" if is_a else "[out, r]"
                raise CheckpointError(f"key {key!r} has shape {tuple(t.shape)}; lora_{'A' if is_a else 'B'} is "
                                      f"{want} with r={r} from {origin}")
            twin = key.replace("_A", "_B") if is_a else key.replace("_B", "_A")
            if twin not in tensors:
                raise CheckpointError(f"key {key!r} has no matching {twin!r} in the checkpoint")
            if tensors[twin].shape[1 if is_a else 0] != rank_dim:
                raise CheckpointError(f"keys {key!r} {tuple(t.shape)} and {twin!r} {tuple(tensors[twin].shape)} "
                                      "disagree on the rank")
        elif key.endswith("trainable_tokens_delta"):
            count = _token_count(config, module)
            if count is not None and t.shape[0] != count:
                raise CheckpointError(f"key {key!r} has {t.shape[0]} token rows; {origin} lists {count} "
                                      "token indices for it")


def split_fused(tensors: dict, config, spec: dict[str, list[tuple[str, int]]]):
    """Fused projections -> per-projection keys: ``{"qkv_proj": [("q_proj", 4096), ("k_proj",
    1024), ("v_proj", 1024)]}``. lora_B [sum(out), r] is cut along its rows; lora_A is shared
    (x A^T feeds every projection) and copied to each."""
    out, done = {}, set()
    for key, t in tensors.items():
        module = module_of(key)
        fused = module.rsplit(".", 1)[-1]
        if fused not in spec or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            out[key] = t
            continue
        parts, parent = spec[fused], module[: -len(fused)]
        if key.endswith(".lora_B.weight"):
            total = sum(size for _, size in parts)
            if t.shape[0] != total:
                raise CheckpointError(f"--split {fused}: key {key!r} has {t.shape[0]} output rows, the split "
                                      f"sizes add up to {total}")
            starts = np.cumsum([0] + [size for _, size in parts])
            pieces = [t[a:b] for a, b in zip(starts[:-1], starts[1:])]
        else:
            pieces = [t] * len(parts)
        for (name, _), piece in zip(parts, pieces):
            out[key.replace(f"{module}.", f"{parent}{name}.", 1)] = _copy(piece)
        done.add(fused)
    if isinstance(config, LoraConfig) and done:
        names = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
        new = [n for n in names if n not in done] + [p for f in sorted(done) for p, _ in spec[f]]
        config = dataclasses.replace(config, target_modules=sorted(set(new)))
    return out, config


# ------------------------------------------------------------------------------- main
def _progress(items, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", disable=quiet or None, file=sys.stderr, leave=False)


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise ValueError(f"OUT {out!r} is a file; OUT is a directory to write")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ValueError(f"OUT {out!r} already exists and holds {shown}: pass --overwrite to replace its adapter, "
                         "or choose another OUT")


def consolidate(src: str, out: str, *, tag: Optional[str] = None, config: Optional[str] = None,
                dtype: Optional[str] = None, adapter_name: Optional[str] = None, strip_prefix: str = "",
                split: Optional[dict] = None, quiet: bool = False, warn=None, lora_alpha: Optional[float] = None,
                guess_alpha: bool = False, overwrite: bool = False, target: Optional[str] = None,
                max_lora_rank: Optional[int] = None, base: Optional[str] = None) -> dict:
    """Write the PEFT directory ``out`` from the checkpoint ``src``; returns a summary. ``out``
    must not exist (or be empty) unless ``overwrite``; ``lora_alpha`` / ``guess_alpha``: see
    ``infer_config``; ``target`` ("vllm"): refuse, naming each change, what that engine would not
    serve (checkpoint/serving.py; ``max_lora_rank`` as it would be started with); ``base``: the HF
    base model directory, for a torchtitan source's head count."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if _inside(out, src) or _inside(src, out):
        raise ValueError(f"OUT {out!r} and SRC {src!r} overlap: the source is never written to; choose another OUT")
    _check_out(out, overwrite)
    source = open_source(src, tag, base)
    keys = AdapterKeys(source.names, getattr(source, "dir", src), adapter_name, strip_prefix or source.outer_prefix,
                       getattr(source, "peft_keys", False))
    shapes = {k: source.shapes[v] for k, v in keys.to_source.items()}
    tensors: dict[str, Any] = {}
    for key, name in _progress(keys.to_source.items(), "consolidating", quiet):
        t = source.read(name)
        tensors[key] = _convert(t, DTYPES[dtype]) if dtype else t
    cfg, origin = find_config(src, source, config, shapes, keys.with_lora, warn, lora_alpha, guess_alpha)
    check_shapes(tensors, cfg, origin)
    if split:
        tensors, cfg = split_fused(tensors, cfg, split)
    if target is not None:
        serving.check(target, cfg.to_dict(), tensors, max_lora_rank)
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, WEIGHTS_NAME)) as tmp:
        _save(tensors, tmp)
    cfg.save(out, inference_mode=True)
    size = sum(_nbytes(t) for t in tensors.values())
    return {**source.describe(), "adapter_name": keys.adapter_name, "tensors": len(tensors), "bytes": size,
            "config": origin, "out": out, "other_adapters": keys.others}


def inspect(path: str, tag: Optional[str] = None, adapter_name: Optional[str] = None, strip_prefix: str = "",
            base: Optional[str] = None) -> dict:
    """Format, world size, stage and tag, the adapter's keys with shapes and dtypes, and its config;
    reads metadata only (a DCP or ZeRO checkpoint's tensors are not loaded)."""
    source = open_source(path, tag, base)
    info = source.describe()
    try:
        keys = AdapterKeys(source.names, getattr(source, "dir", path), adapter_name,
                           strip_prefix or source.outer_prefix, getattr(source, "peft_keys", False))
    except ValueError as exc:
        return {**info, "adapter": None, "note": str(exc), "tensors_total": len(source.names)}
    shapes = {k: source.shapes[v] for k, v in keys.to_source.items()}
    dtypes = {k: _dtype_of(source, v) for k, v in keys.to_source.items()}
    found = _candidates(path, source)
    config = load_config(os.path.dirname(found[0])).to_dict() if found else None
    return {**info, "adapter_name": keys.adapter_name, "other_adapters": keys.others,
            "tensors_total": len(source.names),
            "adapter": {k: {"shape": list(shapes[k]), "dtype": dtypes[k]} for k in shapes},
            "adapter_parameters": sum(math.prod(s) for s in shapes.values()),
            "config_file": found[0] if found else None, "config": config}


def _dtype_of(source, name: str) -> str:
    if hasattr(source, "dtype"):
        return str(source.dtype(name)).replace("torch.", "")
    if getattr(source, "format", "") == "deepspeed":
        return "float32"  # the fp32 master partitions
    return str(source.read(name).dtype).replace("torch.", "")  # numpy: 'float32' etc.


__all__ = ["consolidate", "inspect", "open_source", "PREFIX"]
