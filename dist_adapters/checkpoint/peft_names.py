"""File names and the key prefix of a PEFT adapter directory (see peft_format.py for the
mapping). Kept apart so that offline readers can use them without importing the layers."""

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
