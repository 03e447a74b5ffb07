"""The recipe configuration: YAML sections, ``--set a.b=value`` overrides, validation.

Every key the recipe reads is listed in ``DEFAULTS``; a key in the file or in ``--set`` that is
not there is an error naming it (a typo must never silently fall back to a default). The
``adapter`` section holds LoraConfig fields (peft's names), or ``peft_type: TRAINABLE_TOKENS``
with TrainableTokensConfig fields, and is checked by building that config.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import yaml

from ..config import UNSUPPORTED_LORA_FIELDS, LoraConfig, TrainableTokensConfig, unsupported_value
from ..parallel.strategies import STRATEGIES
from .builtin import BUILTIN_MODELS


class RecipeError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"path": None, "builtin": "llama", "dtype": "float32", "quantization": None,
              "output_router_logits": None, "tokenizer_path": None},
    "adapter": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "data": {"path": None, "seq_len": 64, "format": "auto", "train_on": None, "packing": False, "eval_path": None,
             "eval_fraction": 0.0},
    "train": {
        "steps": 30, "global_batch_size": 8, "micro_batch_size": 4, "lr": 1.0e-3, "seed": 0,
        "checkpoint_every": 10, "resume_from": None, "output_dir": "runs/demo", "overwrite": False,
        "weight_decay": 0.0, "warmup_steps": 0, "lr_schedule": "constant", "max_grad_norm": 1.0,
        "optimizer": "adamw", "eval_every": 0, "eval_generate": 0,
    },
    "parallel": {"strategy": "none", "tp_size": 1, "ep_size": 1, "use_orig_params": False, "deepspeed_config": None,
                 "activation_checkpointing": False, "mixed_precision": None, "fused_lora": True, "compile": False},
    "launch": {"launcher": "torchrun", "nproc_per_node": 1, "nnodes": 1, "node_rank": 0, "master_addr": None,
               "master_port": None, "local_addr": None, "hostfile": None, "max_restarts": 0,
               "timeout_minutes": 30},
}

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "sgd")
FORMATS = ("auto", "text", "prompt_completion", "messages")  # data.format (recipe/formats.py)
TRAIN_ON = (None, "completion", "all")                        # data.train_on; None: by format


def _merge(base: dict, override: dict, source: str) -> None:
    for section, values in override.items():
        if section not in DEFAULTS:
            raise RecipeError(f"unknown section '{section}' in {source} (sections: {', '.join(DEFAULTS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise RecipeError(f"section '{section}' in {source} must be a mapping, got {type(values).__name__}")
        if section == "adapter":
            base["adapter"] = dict(values)  # a given adapter section replaces the default whole
            continue
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise RecipeError(f"unknown key '{section}.{key}' in {source} "
                                  f"(keys of '{section}': {', '.join(DEFAULTS[section])})")
            base[section][key] = value


def apply_override(cfg: dict, assignment: str) -> str:
    """``a.b=value`` with value parsed as YAML (numbers, booleans, null, lists); returns ``a.b``."""
    key, sep, raw = assignment.partition("=")
    if not sep or "." not in key:
        raise RecipeError(f"--set expects section.key=value, got {assignment!r}")
    section, _, name = key.partition(".")
    if section not in DEFAULTS:
        raise RecipeError(f"unknown section '{section}' in --set {assignment}")
    if section != "adapter" and name not in DEFAULTS[section]:
        raise RecipeError(f"unknown key '{key}' in --set (keys of '{section}': {', '.join(DEFAULTS[section])})")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    cfg[section][name] = value
    return key


def load_recipe(path: str, overrides: list[str] = ()) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, data, path)
    where = Origins(path)
    for assignment in overrides:
        where.overridden.add(apply_override(cfg, assignment))
    coerce_numbers(cfg)
    validate(cfg, where)
    return cfg


class Origins:
    """Where a key's value came from, for error messages: the config file, or ``--set``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.overridden: set[str] = set()

    def __call__(self, key: str) -> str:
        """``key``: ``section.name``, or ``section.`` for any key of the section."""
        hit = key in self.overridden or (key.endswith(".") and any(k.startswith(key) for k in self.overridden))
        return "--set" if hit else self.path


# Numeric options. YAML 1.1 (PyYAML) reads 5e-3 or 1_000 as strings, and --set values are YAML
# too: every spelling Python's int() / float() accept is a number here.
NUMBERS = {
    "train.lr": float, "train.weight_decay": float, "train.max_grad_norm": float, "train.steps": int,
    "train.global_batch_size": int, "train.micro_batch_size": int, "train.checkpoint_every": int,
    "train.warmup_steps": int, "train.seed": int, "data.seq_len": int, "parallel.tp_size": int,
    "parallel.ep_size": int, "data.eval_fraction": float, "train.eval_every": int, "train.eval_generate": int,
    "launch.nproc_per_node": int, "launch.nnodes": int, "launch.node_rank": int, "launch.master_port": int,
    "launch.max_restarts": int, "launch.timeout_minutes": float,
}


def _number(value, kind):
    """``value`` as a ``kind`` when it is a string ``kind()`` reads; otherwise unchanged (the
    validation then names it)."""
    if not isinstance(value, str):
        return value
    try:
        return kind(value.strip())
    except ValueError:
        return value


def coerce_numbers(cfg: dict) -> None:
    for key, kind in NUMBERS.items():
        section, name = key.split(".")
        cfg[section][name] = _number(cfg[section][name], kind)


def _positive_int(cfg: dict, key: str, where: Origins, minimum: int = 1) -> int:
    section, name = key.split(".")
    value = cfg[section][name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"{where(key)}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def adapter_config(cfg: dict):
    """The LoraConfig / TrainableTokensConfig the ``adapter`` section describes."""
    section = dict(cfg["adapter"])
    cls = TrainableTokensConfig if section.pop("peft_type", "LORA") == "TRAINABLE_TOKENS" else LoraConfig
    fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    extra = {}
    for key in list(section):
        if key in fields:
            continue
        if cls is LoraConfig and key in UNSUPPORTED_LORA_FIELDS:  # peft's, as the JSON loader treats them
            reason = unsupported_value(key, section[key])
            if reason:
                raise RecipeError(f"adapter.{key}={section[key]!r} is {reason}")
            extra[key] = section.pop(key)
            continue
        raise RecipeError(f"unknown key 'adapter.{key}' (not a {cls.__name__} field)")
    numeric = {f.name: {"int": int, "float": float}[f.type] for f in dataclasses.fields(cls)
               if f.type in ("int", "float")}
    section = {k: _number(v, numeric[k]) if k in numeric else v for k, v in section.items()}
    try:
        return cls(**section, **({"extra": extra} if extra else {}))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"adapter: {exc}") from None


def validate(cfg: dict, where) -> None:
    """``where``: an ``Origins``, or the config file's path (every value from that file)."""
    if isinstance(where, str):
        where = Origins(where)
    train, par, launch = cfg["train"], cfg["parallel"], cfg["launch"]
    if par["strategy"] not in STRATEGIES:
        raise RecipeError(f"{where('parallel.strategy')}: unknown parallel.strategy {par['strategy']!r} "
                          f"(one of: {', '.join(STRATEGIES)})")
    if cfg["model"]["builtin"] not in BUILTIN_MODELS:
        raise RecipeError(f"{where('model.builtin')}: model.builtin must be one of {', '.join(BUILTIN_MODELS)}, "
                          f"got {cfg['model']['builtin']!r}")
    if cfg["model"]["output_router_logits"] not in (None, True, False):
        raise RecipeError(f"{where('model.output_router_logits')}: model.output_router_logits must be true, false "
                          f"or null (the model config's own), got {cfg['model']['output_router_logits']!r}")
    if cfg["model"]["dtype"] not in DTYPES:
        raise RecipeError(f"{where('model.dtype')}: model.dtype must be one of {', '.join(DTYPES)}, "
                          f"got {cfg['model']['dtype']!r}")
    if par["mixed_precision"] not in (None, "bfloat16", "float16"):
        raise RecipeError(f"{where('parallel.mixed_precision')}: parallel.mixed_precision must be null, bfloat16 "
                          "or float16")
    if train["lr_schedule"] not in SCHEDULES:
        raise RecipeError(f"{where('train.lr_schedule')}: train.lr_schedule must be one of {', '.join(SCHEDULES)}")
    if train["optimizer"] not in OPTIMIZERS:
        raise RecipeError(f"{where('train.optimizer')}: train.optimizer must be one of {', '.join(OPTIMIZERS)}, "
                          f"got {train['optimizer']!r}")
    clip = train["max_grad_norm"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        raise RecipeError(f"{where('train.max_grad_norm')}: train.max_grad_norm must be a number >= 0 or null "
                          f"(no clipping), got {clip!r}")
    for key in ("train.steps", "train.global_batch_size", "train.micro_batch_size", "train.checkpoint_every",
                "data.seq_len", "launch.nproc_per_node", "launch.nnodes", "parallel.tp_size",
                "parallel.ep_size"):
        _positive_int(cfg, key, where)
    _positive_int(cfg, "train.warmup_steps", where, minimum=0)
    _validate_data(cfg, where)
    for key in ("train.overwrite", "parallel.use_orig_params", "parallel.activation_checkpointing",
                "parallel.fused_lora", "parallel.compile"):
        section, name = key.split(".")
        if not isinstance(cfg[section][name], bool):
            raise RecipeError(f"{where(key)}: {key} must be true or false, got {cfg[section][name]!r}")
    if par["compile"] and not STRATEGIES[par["strategy"]].compile:
        verified = ", ".join(n for n, s in STRATEGIES.items() if s.compile)
        raise RecipeError(f"{where('parallel.compile')}: parallel.compile runs under {verified}, "
                          f"not parallel.strategy {par['strategy']}")
    if not isinstance(train["lr"], (int, float)) or train["lr"] <= 0:
        raise RecipeError(f"{where('train.lr')}: train.lr must be a number > 0, got {train['lr']!r}")
    if train["global_batch_size"] % train["micro_batch_size"]:
        raise RecipeError(f"{where('train.')}: train.global_batch_size ({train['global_batch_size']}) must be a "
                          f"multiple of train.micro_batch_size ({train['micro_batch_size']})")
    if launch["launcher"] not in ("torchrun", "deepspeed", "mpirun", "srun"):
        raise RecipeError(f"{where('launch.launcher')}: launch.launcher must be torchrun, deepspeed, mpirun or srun")
    _validate_launch(launch, where)
    if not isinstance(train["output_dir"], str) or not train["output_dir"]:
        raise RecipeError(f"{where('train.output_dir')}: train.output_dir must be a path")
    adapter_config(cfg)


def _validate_data(cfg: dict, where: Origins) -> None:
    """The data section and the evaluation keys of train."""
    data = cfg["data"]
    if data["format"] not in FORMATS:
        raise RecipeError(f"{where('data.format')}: data.format must be one of {', '.join(FORMATS)}, got {data['format']!r}")
    if data["train_on"] not in TRAIN_ON:
        raise RecipeError(f"{where('data.train_on')}: data.train_on must be completion, all or null (completion for "
                          f"prompt/completion and messages data, all for text), got {data['train_on']!r}")
    if not isinstance(data["packing"], bool):
        raise RecipeError(f"{where('data.packing')}: data.packing must be true or false, got {data['packing']!r}")
    fraction = data["eval_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise RecipeError(f"{where('data.eval_fraction')}: data.eval_fraction must be a number in [0, 1), got {fraction!r}")
    if fraction and data["eval_path"]:
        raise RecipeError(f"{where('data.')}: set data.eval_path or data.eval_fraction, not both")
    for key in ("train.eval_every", "train.eval_generate"):
        _positive_int(cfg, key, where, minimum=0)
    asks = [k for k in ("eval_every", "eval_generate") if cfg["train"][k]]
    if asks and not (fraction or data["eval_path"]):
        raise RecipeError(f"{where('train.' + asks[0])}: train.{asks[0]} needs evaluation data: set data.eval_path or "
                          "data.eval_fraction")


def _validate_launch(launch: dict, where: Origins) -> None:
    """The launcher's own checks (launcher.validate), reported under the recipe's key names."""
    from ..launch_cmd import spec_from_recipe
    from ..launcher import LaunchError, validate as validate_spec

    for key in ("node_rank", "max_restarts"):
        if isinstance(launch[key], bool) or not isinstance(launch[key], int):
            raise RecipeError(f"{where('launch.' + key)}: launch.{key} must be an integer, got {launch[key]!r}")
    if launch["master_port"] is not None and (isinstance(launch["master_port"], bool)
                                              or not isinstance(launch["master_port"], int)):
        raise RecipeError(f"{where('launch.master_port')}: launch.master_port must be an integer, "
                          f"got {launch['master_port']!r}")
    try:
        validate_spec(spec_from_recipe(launch))
    except LaunchError as exc:
        message = str(exc)
        for flag in ("node-rank", "max-restarts", "master-addr", "master-port", "local-addr", "nnodes", "nproc-per-node",
                     "launcher", "hostfile"):
            message = message.replace(f"--{flag}", f"launch.{flag.replace('-', '_')}")
        raise RecipeError(f"{where('launch.')}: {message}") from None


def launch_world_size(launch: dict) -> int:
    """Ranks the launch section starts: the hostfile's slots (deepspeed, mpirun) or nnodes x nproc."""
    if launch["hostfile"] and launch["launcher"] in ("deepspeed", "mpirun"):
        from ..launcher import LaunchError, read_hostfile

        try:
            return sum(slots for _, slots in read_hostfile(launch["hostfile"]))
        except LaunchError as exc:
            raise RecipeError(f"launch.hostfile: {exc}") from None
    return launch["nnodes"] * launch["nproc_per_node"]


def data_parallel_size(cfg: dict, world_size: int) -> int:
    """How many ranks train on different samples: the world, or world / tp_size under tensor
    parallel (the ranks of one tensor-parallel group see the same samples)."""
    strategy, tp = cfg["parallel"]["strategy"], cfg["parallel"]["tp_size"]
    _check_expert_parallel(strategy, cfg["parallel"]["ep_size"], world_size)
    if not STRATEGIES[strategy].tensor_parallel:
        if tp != 1:
            with_tp = " or ".join(name for name, s in STRATEGIES.items() if s.tensor_parallel)
            raise RecipeError(f"parallel.tp_size {tp} needs parallel.strategy {with_tp}, not {strategy!r}")
        return world_size
    if not STRATEGIES[strategy].data_parallel and tp != world_size:
        both = " or ".join(name for name, s in STRATEGIES.items() if s.tensor_parallel and s.data_parallel)
        raise RecipeError(f"parallel.strategy {strategy} runs one model over all ranks: parallel.tp_size ({tp}) must "
                          f"equal the world size ({world_size}); for data parallel x tensor parallel use {both}")
    if world_size % tp:
        raise RecipeError(f"parallel.tp_size ({tp}) must divide the world size ({world_size})")
    return world_size // tp


def _check_expert_parallel(strategy: str, ep: int, world_size: int) -> None:
    with_ep = " or ".join(name for name, s in STRATEGIES.items() if s.expert_parallel)
    if not STRATEGIES[strategy].expert_parallel:
        if ep != 1:
            raise RecipeError(f"parallel.ep_size {ep} needs parallel.strategy {with_ep}, not {strategy!r}")
        return
    if ep < 2:
        raise RecipeError(f"parallel.strategy {strategy} shards the experts over parallel.ep_size ranks: set "
                          "parallel.ep_size to 2 or more")
    if STRATEGIES[strategy].ep_is_world and ep != world_size:
        raise RecipeError(f"parallel.strategy {strategy} puts each expert on one rank: parallel.ep_size ({ep}) must "
                          f"equal the world size ({world_size})")
    if world_size % ep:
        raise RecipeError(f"parallel.ep_size ({ep}) must divide the world size ({world_size})")


def check_world(cfg: dict, world_size: int) -> int:
    """Gradient-accumulation steps for this world size; errors when the batch does not divide."""
    g, m = cfg["train"]["global_batch_size"], cfg["train"]["micro_batch_size"]
    dp = data_parallel_size(cfg, world_size)
    if g % (m * dp):
        what = "world size" if dp == world_size else "data-parallel size (world / tp_size)"
        raise RecipeError(f"train.global_batch_size ({g}) must be a multiple of micro_batch_size x {what} "
                          f"({m} x {dp})")
    return g // (m * dp)
