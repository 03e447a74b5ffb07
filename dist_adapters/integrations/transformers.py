"""transformers' Trainer (and TRL's trainers, which are Trainers) on a model with our adapter.

``AdapterCheckpointCallback`` makes every ``checkpoint-N/`` of an injected model hold:

* ``adapter/``: the PEFT directory (``save_adapter``: a collective save, so every rank takes
  part under DDP, FSDP and DeepSpeed ZeRO-3, and only rank 0 writes);
* the Trainer's own files for ``resume_from_checkpoint`` (optimizer, scheduler, RNG, state),
  whose model weights are only the trainable tensors: the frozen base is listed in the model's
  ``_keys_to_ignore_on_save``, which ``PreTrainedModel.save_pretrained`` honours, so the
  checkpoint no longer grows with the base model. The Trainer resumes by loading those tensors
  with ``strict=False`` (and stays quiet when the missing keys are exactly the ignored ones).

Under DeepSpeed the Trainer writes the engine's own checkpoint (``global_stepN/``), and asks
DeepSpeed to leave the frozen parameters out only for a peft ``PeftModel``. Each rank therefore
rewrites its own ZeRO-3 model-states file without ``frozen_param_fragments`` (its partition of
the frozen base), which is what ``save_checkpoint(exclude_frozen_parameters=True)`` writes and
what DeepSpeed's loader accepts (it restores those fragments only when present). Under ZeRO-1/2
the frozen base also sits in the strict ``module`` state the Trainer loads back, so it stays: use
ZeRO-3 (or ``dist-adapters train``) for adapter-sized DeepSpeed checkpoints.

The checkpoint's ``config.json`` is removed: loading ``checkpoint-N/`` as a model directory
would otherwise give a model with a randomly initialised base and no error. The way to load it
is ``PeftModel.from_pretrained(base, "checkpoint-N/adapter")`` (or ``da.load_adapter``).

    trainer = SFTTrainer(model=da.inject(model, config), ..., callbacks=[AdapterCheckpointCallback()])

The class is built on first use (module ``__getattr__``): its base, transformers' ``TrainerCallback``,
lives in a module that imports peft whenever peft is installed, and this library never imports
peft (``tests/test_layers.py`` imports every module of the package and checks).
"""

from __future__ import annotations

import glob
import os

import torch

from ..checkpoint.atomic import atomic_path
from ..checkpoint.peft_format import save_adapter
from ..control import unwrap

MODEL_DIR_FILES = ("config.json", "generation_config.json")  # what makes a directory look like a model
PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def frozen_state_keys(model) -> set[str]:
    """State-dict keys of ``model`` that are not trainable parameters (the base, buffers)."""
    inner = unwrap(model)
    trainable = {name for name, p in inner.named_parameters() if p.requires_grad}
    return {key for key in inner.state_dict(keep_vars=True) if key not in trainable}


def drop_frozen_fragments(checkpoint: str, rank: int) -> list[str]:
    """Rewrite this rank's ZeRO-3 model-states files of ``checkpoint`` without the frozen
    parameters' partitions (read back with ``weights_only=True``; written atomically)."""
    rewritten = []
    for path in sorted(glob.glob(os.path.join(checkpoint, "global_step*", f"*zero_pp_rank_{rank}_mp_rank_*_model_states.pt"))):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("frozen_param_fragments") is None:
            continue
        state["frozen_param_fragments"] = state["frozen_param_shapes"] = None
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        rewritten.append(path)
    return rewritten


def _callback_class() -> type:
    from transformers import TrainerCallback

    class AdapterCheckpointCallback(TrainerCallback):
        """Adapter-only Trainer checkpoints with a PEFT ``adapter/`` directory (module docstring).

        ``adapter_dir``: the sub-directory of each checkpoint the PEFT adapter goes to.
        """

        def __init__(self, adapter_dir: str = "adapter") -> None:
            self.adapter_dir = adapter_dir

        def _exclude_frozen(self, model) -> None:
            if model is None:
                return
            inner = unwrap(model)
            if not any(p.requires_grad for p in inner.parameters()):
                raise ValueError("AdapterCheckpointCallback: the model has no trainable parameter; inject an "
                                 "adapter first (dist_adapters.inject)")
            inner._keys_to_ignore_on_save = frozen_state_keys(inner)

        def on_init_end(self, args, state, control, model=None, **kwargs):
            self._exclude_frozen(model)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._exclude_frozen(model)  # the Trainer may have wrapped or replaced the model since

        def on_save(self, args, state, control, model=None, **kwargs):
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            drop_frozen_fragments(checkpoint, torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)
            save_adapter(model, os.path.join(checkpoint, self.adapter_dir))  # every rank: a collective save
            if state.is_world_process_zero:
                for name in MODEL_DIR_FILES:
                    path = os.path.join(checkpoint, name)
                    if os.path.isfile(path):
                        os.remove(path)

    AdapterCheckpointCallback.__module__, AdapterCheckpointCallback.__qualname__ = __name__, "AdapterCheckpointCallback"
    return AdapterCheckpointCallback


def __getattr__(name: str):
    if name == "AdapterCheckpointCallback":
        cls = globals()[name] = _callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
