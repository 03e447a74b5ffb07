"""The recipe under a launcher, observed from outside: what the engine really ran.

    recipe_probe.py RESULT_JSON CONFIG [--set ...]

After the adapter is injected, forward hooks record on every rank:
- ``block_calls``: how many times each transformer block's MLP ran ``forward`` (activation
  checkpointing runs each block's body again in backward: twice as many). Counted by wrapping the
  MLP class's ``forward``: the recomputation in backward does not fire module hooks here;
- ``training``: the blocks' ``training`` flags seen in forward (eval mode would silently turn off
  dropout and transformers' activation checkpointing);
- ``base_dtypes``: the dtypes of the first adapted Linear's base weight and output while it ran
  (FSDP mixed precision computes in its param_dtype over fp32 shards).
Forwards without gradients (the save-time verification probe of checkpoint/verification.py)
are not counted. Rank 0 writes them to RESULT_JSON when the run ends. The library knows nothing
of this.
"""

import json
import os
import sys

import torch

from dist_adapters import cli
from dist_adapters.recipe import train

result_file, *argv = sys.argv[1:]
seen = {"block_calls": {}, "base_dtypes": set(), "training": set()}
inject = train.inject


def probed_inject(model, config, *args, **kwargs):
    out = inject(model, config, *args, **kwargs)
    names = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("DecoderLayer"):
            names[id(module.mlp)] = name
            seen["block_calls"][name] = 0
    mlp_class = type(next(m.mlp for m in model.modules() if type(m).__name__.endswith("DecoderLayer")))
    forward = mlp_class.forward

    def counting_forward(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training forwards only (not the save-time verification probe)
            seen["block_calls"][names[id(self)]] += 1
            seen["training"].add(self.training)
        return forward(self, *args, **kwargs)

    mlp_class.forward = counting_forward
    base = next(m.base_layer for m in model.modules() if type(m).__name__ in ("LoraLinear", "LoraQuantizedLinear"))
    base.register_forward_hook(lambda m, a, o: seen["base_dtypes"].add(
        (str(getattr(m.weight, "dtype", None)), str(o.dtype))))
    return out


train.inject = probed_inject
code = cli.main(["train", *argv])
if int(os.environ.get("RANK", "0")) == 0:
    with open(result_file, "w", encoding="utf-8") as fh:
        json.dump({"block_calls": seen["block_calls"], "base_dtypes": sorted(seen["base_dtypes"]),
                   "training": sorted(seen["training"])}, fh)
sys.exit(code)
