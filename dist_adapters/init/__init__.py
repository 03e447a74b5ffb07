"""Weight-dependent adapter initialisations (they read the full base weight through the engine access: rule 3 of docs/architecture.md).

- ``loftq``: LoftQ (quantize the base, start LoRA at the low-rank part of the quantization error).
"""

from .loftq import (LoftQInputError, dequantize, loftq_factors, loftq_model_dir, low_rank, quantize,
                    quantize_dequantize, replace_lora_weights_loftq)

__all__ = ["LoftQInputError", "quantize", "dequantize", "quantize_dequantize", "low_rank", "loftq_factors",
           "loftq_model_dir", "replace_lora_weights_loftq"]
