"""Adapter configurations with peft's field names, and adapter_config.json both ways.

The JSON written here is what peft 0.21 writes for the same adapter, and peft's JSON reads back
into these classes. Keys this project does not know (newer peft fields, user additions) are kept
in ``extra`` and written back unchanged, never dropped. Keys peft knows for features this project
does not implement (DoRA, ...) are accepted only at their inactive default; anything else is an
error naming the key, because silently training a different adapter than the file describes is
worse than refusing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

CONFIG_NAME = "adapter_config.json"

# peft fields for methods we do not implement, with the value meaning "off". A JSON carrying any
# other value is refused; the default is kept and written back.
UNSUPPORTED_LORA_FIELDS: dict[str, Any] = {
    "lora_bias": False,
    "layer_replication": None,
    "eva_config": None,
    "corda_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "arrow_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "monteclora_config": None,
    "velora_config": None,
}


def _is_off(value: Any, off: Any) -> bool:
    return value == off or (off is None and value in ({}, [], False))


def unsupported_value(key: str, value) -> Optional[str]:
    """Why ``value`` for the peft field ``key`` (a feature this project does not implement) is
    refused, or None when it is that feature's "off" value. One wording for the Python API, the
    JSON loader and the recipe."""
    off = UNSUPPORTED_LORA_FIELDS[key]
    if _is_off(value, off):
        return None
    return f"a peft feature dist_adapters does not implement; only {off!r} is accepted"


@dataclass
class LoftQConfig:
    """LoftQ initialisation (see ``LoraConfig(init_lora_weights="loftq")``), peft's field names."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in (2, 4, 8):
            raise ValueError(f"LoftQConfig.loftq_bits must be 2, 4 or 8, got {self.loftq_bits!r}")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"LoftQConfig.loftq_iter must be an integer >= 1, got {self.loftq_iter!r}")

    def to_dict(self) -> dict:
        return {"loftq_bits": self.loftq_bits, "loftq_iter": self.loftq_iter}


@dataclass
class _PeftConfigBase:
    """Fields every peft config carries (peft's ``PeftConfig``)."""

    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None
    # Keys of a loaded adapter_config.json that this class has no field for; written back as is.
    extra: dict = field(default_factory=dict, repr=False)

    PEFT_TYPE = ""

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)  # peft writes sets as lists; sorted keeps the file stable
            elif isinstance(value, LoftQConfig):
                value = value.to_dict()
            out[f.name] = value
        out.update(self.extra)
        out["peft_type"] = self.PEFT_TYPE
        return dict(sorted(out.items()))

    def save(self, directory: str, **overrides: Any) -> str:
        """Write ``directory/adapter_config.json`` atomically (``overrides`` replace keys in the
        file only); returns the path."""
        from .checkpoint.atomic import atomic_write_text

        path = os.path.join(directory, CONFIG_NAME)
        data = {**self.to_dict(), **overrides}
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path


@dataclass
class LoraConfig(_PeftConfigBase):
    """LoRA configuration; every field has peft's name, default and meaning."""

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    target_parameters: Optional[list[str]] = None  # parameter names or suffixes (MoE experts, routers)
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False  # DoRA (layers/dora.py): Linear, Conv1D, Embedding
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Union[list[int], dict]] = None
    loftq_config: Union[LoftQConfig, dict] = field(default_factory=dict)

    PEFT_TYPE = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.loftq_config, dict) and self.loftq_config:
            self.loftq_config = LoftQConfig(**self.loftq_config)
        self.validate()

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise ValueError(f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        weight_init = isinstance(self.init_lora_weights, str) and (
            self.init_lora_weights in ("pissa", "olora") or (self.init_lora_weights.startswith("pissa_niter_")
                                                             and self.init_lora_weights[12:].isdigit()))
        if self.init_lora_weights not in (True, False, "gaussian", "loftq") and not weight_init:
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'loftq', 'pissa', 'pissa_niter_K' "
                f"or 'olora', got {self.init_lora_weights!r}"
            )
        if self.init_lora_weights == "loftq" and not isinstance(self.loftq_config, LoftQConfig):
            raise ValueError("LoraConfig.loftq_config must be set when init_lora_weights='loftq'")
        if isinstance(self.loftq_config, LoftQConfig) and self.init_lora_weights != "loftq":
            raise ValueError("LoraConfig.loftq_config is set but init_lora_weights is not 'loftq'")
        for name in ("rank_pattern", "alpha_pattern"):
            for key, value in getattr(self, name).items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"LoraConfig.{name}[{key!r}] must be > 0, got {value!r}")
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None:
                raise ValueError("LoraConfig.layers_to_transform cannot be used when target_modules is a str (regex)")
            if self.layers_pattern:
                raise ValueError("LoraConfig.layers_pattern cannot be used when target_modules is a str (regex)")
        if self.target_parameters is not None and (not isinstance(self.target_parameters, list) or not all(
                isinstance(t, str) and t for t in self.target_parameters)):
            raise ValueError(f"LoraConfig.target_parameters must be a list of parameter names, "
                             f"got {self.target_parameters!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern is set but layers_to_transform is not")
        tti = self.trainable_token_indices
        if isinstance(tti, dict):
            if not tti:
                raise ValueError("LoraConfig.trainable_token_indices is an empty dict")
            for module, indices in tti.items():
                validate_token_indices(list(indices), f"LoraConfig.trainable_token_indices[{module!r}]")
        elif tti is not None:
            validate_token_indices(list(tti), "LoraConfig.trainable_token_indices")
        for key in UNSUPPORTED_LORA_FIELDS:
            if key in self.extra and unsupported_value(key, self.extra[key]):
                raise ValueError(f"key {key!r}={self.extra[key]!r} is {unsupported_value(key, self.extra[key])}")


@dataclass
class TrainableTokensConfig(_PeftConfigBase):
    """Standalone trainable tokens (peft's ``TrainableTokensConfig``)."""

    token_indices: list[int] = field(default_factory=list)
    target_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    PEFT_TYPE = "TRAINABLE_TOKENS"

    def __post_init__(self) -> None:
        self.token_indices = list(self.token_indices)
        validate_token_indices(self.token_indices, "TrainableTokensConfig.token_indices")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"TrainableTokensConfig.init_weights must be True or False, got {self.init_weights!r}")


def validate_token_indices(indices: list, where: str) -> None:
    """Errors for an empty list, non-integers, negatives and duplicates (range is checked at injection)."""
    if len(indices) == 0:
        raise ValueError(f"{where} is empty: give at least one token index")
    for i, idx in enumerate(indices):
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise ValueError(f"{where}[{i}] = {idx!r} is not a non-negative integer token index")
    seen: set[int] = set()
    dups = sorted({idx for idx in indices if idx in seen or seen.add(idx)})
    if dups:
        raise ValueError(f"{where} has duplicate token indices {dups}")


_CONFIG_CLASSES = {"LORA": LoraConfig, "TRAINABLE_TOKENS": TrainableTokensConfig}
AdapterConfig = Union[LoraConfig, TrainableTokensConfig]


def config_from_dict(data: dict, source: str = "<dict>") -> AdapterConfig:
    """Build a config from peft's JSON dict; unknown keys go to ``extra``."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    peft_type = data.pop("peft_type", "LORA")
    cls = _CONFIG_CLASSES.get(peft_type)
    if cls is None:
        raise ValueError(
            f"{source}: peft_type {peft_type!r} is not supported (supported: {sorted(_CONFIG_CLASSES)})"
        )
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    try:
        return cls(**known, extra=extra)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc


def get_pattern_key(pattern_keys, name: str) -> str:
    """The rank_pattern / alpha_pattern key matching ``name`` (full name or dotted suffix)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def load_config(directory: str) -> AdapterConfig:
    """Read ``directory/adapter_config.json`` (peft's or ours)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return config_from_dict(data, source=path)
