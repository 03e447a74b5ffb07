"""What a checkpoint may contain besides tensors and containers: the DeepSpeed classes its
files pickle, rebuilt as inert stand-ins (plain attributes; no DeepSpeed code runs, DeepSpeed
need not be installed). Shared by safe_load (torch's weights_only loader) and torch_zip (the
torch-free reader). No torch import here."""

from __future__ import annotations

import enum
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it is; the message names the file (and key)."""


def brief(exc: BaseException) -> str:
    """An exception's message for a one-line error: torch's weights-only refusal reduced to its
    reason (the rest is advice about ``weights_only=False``, which we never take), whitespace
    collapsed."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = "weights-only unpickler: " + text.split("WeightsUnpickler error:", 1)[1].split("Check the doc")[0]
    return " ".join(text.split())[:300]


class _Inert:
    """Stand-in for an allow-listed DeepSpeed object: keeps its pickled attributes, nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.__dict__}>"


class ZeroStageEnum(enum.IntEnum):
    """deepspeed.runtime.zero.config.ZeroStageEnum (pickled as ZeroStageEnum(value))."""
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 3


def _inert(name: str) -> type:
    return type(name.rsplit(".", 1)[1], (_Inert,), {"__module__": "dist_adapters.checkpoint.safe_load"})


# Every DeepSpeed class seen in the checkpoints of deepspeed 0.19 (ZeRO 1/2/3, fp32 / fp16 / bf16
# optimizers); a name outside this list and torch's own is refused.
DEEPSPEED_CLASSES = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStageEnum,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _inert("deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler":
        _inert("deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    "deepspeed.utils.tensor_fragment.fragment_address": _inert("deepspeed.utils.tensor_fragment.fragment_address"),
    "deepspeed.checkpoint.constants.ZeroStageEnum": ZeroStageEnum,
}
