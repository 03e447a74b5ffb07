"""``parallel.compile``: torch.compile each transformer block in place (torchtitan's way).

``block.compile()`` keeps the module object and its parameter names, so engines wrap or shard
the model afterwards exactly as they would an eager one (FSDP2's ``fully_shard`` per block, DDP
around the root), and checkpoints and adapter names are unchanged. The adapter layers inside a
block are traced with it; tests/test_compile.py counts their graph breaks (0).
"""

from __future__ import annotations

from torch import nn

from .fsdp import block_classes


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile every transformer block of ``model`` in place; returns how many were compiled."""
    kinds = tuple(block_classes(model))
    blocks = [m for m in model.modules() if kinds and isinstance(m, kinds)]
    if not blocks:
        raise ValueError("parallel.compile: no transformer block found to compile (transformers' "
                         "_no_split_modules, or a *DecoderLayer / *Block class)")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
