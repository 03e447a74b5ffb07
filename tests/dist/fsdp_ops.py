"""Run under torchrun (2 ranks): merge / unmerge / save / load of adapters under FSDP1 and FSDP2.
Writes its measurements to the JSON file given as argv[2]; the test asserts on them."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist_adapters as da  # noqa: E402
from dist_adapters.parallel import fsdp  # noqa: E402
from helpers import input_ids, randomize_trainable, tiny_llama  # noqa: E402

engine, out_dir, result_file = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")
rank = dist.get_rank()
results = {}


def build(r=4):
    model = tiny_llama(tie=True)
    da.inject(model, da.LoraConfig(r=r, target_modules="all-linear", trainable_token_indices=[3, 5, 100]))
    randomize_trainable(model)
    return model


def wrap(model):
    if engine == "fsdp2":
        return fsdp.shard(model)
    return fsdp.wrap_fsdp1(model, torch.device("cpu"), use_orig_params=engine == "fsdp1_orig")


def fwd(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


plain = build()
expected = fwd(plain)
base_weights = {n: p.detach().clone() for n, p in plain.named_parameters() if "base_layer" in n}
model = wrap(build())
results["sharded_vs_plain"] = (fwd(model) - expected).abs().max().item()

# collective save: every rank calls, rank 0 writes; peft (on rank 0) reproduces the plain logits
da.save_adapter(model, os.path.join(out_dir, "adapter"))
results["saved_files"] = sorted(os.listdir(os.path.join(out_dir, "adapter")))

# merge / unmerge under the engine
da.merge(model)
results["merged_vs_plain"] = (fwd(model) - expected).abs().max().item()
da.unmerge(model)
results["unmerged_vs_plain"] = (fwd(model) - expected).abs().max().item()
if engine == "fsdp2":
    from dist_adapters.parallel.state import read_full

    worst = 0.0
    for n, p in model.named_parameters():
        if "base_layer" in n:
            worst = max(worst, (read_full(p).detach() - base_weights[n]).abs().max().item())
    results["unmerged_weight_diff"] = worst

# collective load into a freshly sharded model whose adapters start elsewhere (zero rows, r=1 edge:
# a [1, 32] factor leaves rank 1 with an empty FSDP2 shard)
fresh = build()
for p in fresh.parameters():
    if p.requires_grad:
        torch.nn.init.zeros_(p)
fresh = wrap(fresh)
da.load_adapter(fresh, os.path.join(out_dir, "adapter"))
results["loaded_vs_plain"] = (fwd(fresh) - expected).abs().max().item()
tiny = wrap(build(r=1))
da.save_adapter(tiny, os.path.join(out_dir, "tiny"))
results["tiny_saved"] = os.path.exists(os.path.join(out_dir, "tiny", "adapter_model.safetensors")) if rank == 0 else True

if rank == 0:
    with open(result_file, "w") as fh:
        json.dump(results, fh)
dist.barrier()
dist.destroy_process_group()
