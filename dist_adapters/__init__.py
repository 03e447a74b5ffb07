"""dist_adapters: LoRA, trainable tokens and modules_to_save built to run sharded, saved in the
Hugging Face PEFT format. Public API (see DESIGN.md); nothing else is exported here."""

from .checkpoint.peft_format import adapter_state_dict, load_adapter, save_adapter
from .config import LoftQConfig, LoraConfig, TrainableTokensConfig
from .control import disabled, set_adapter
from .inject import inject
from .merge import merge, unload, unmerge

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "TrainableTokensConfig", "LoftQConfig", "inject", "adapter_state_dict",
    "save_adapter", "load_adapter", "merge", "unmerge", "unload", "disabled", "set_adapter",
]
