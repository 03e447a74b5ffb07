"""Run under torchrun (2 ranks): merge / unmerge / save / load of adapters under FSDP1 and FSDP2.
Writes its measurements to the JSON file given as argv[2]; the test asserts on them."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist_adapters as da  # noqa: E402
from dist_adapters.parallel import fsdp  # noqa: E402
from helpers import (counting_fused_calls, expected_merged, input_ids, leave_process_group, merged_flags,  # noqa: E402
                     randomize_trainable, tiny_llama)

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
    # torch's FSDP1 as a user calls it, with the library's public wrapping policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, auto_wrap_policy=fsdp.auto_wrap_policy(model), device_id=torch.device("cpu"),
                use_orig_params=engine == "fsdp1_orig")


def full_base_weights(model):
    """{plain name: full tensor} of every frozen parameter, gathered with torch's own tools."""
    if engine == "fsdp2":  # the root group stays unsharded after a forward: its parameters are plain then
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in model.named_parameters() if not p.requires_grad}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model):
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for n, p in model.named_parameters() if not p.requires_grad}


def fwd(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


plain = build()
expected = fwd(plain)
base_weights = {n: p.detach().clone() for n, p in plain.named_parameters() if not p.requires_grad}
merged_target = expected_merged(plain, [3, 5, 100])
model = wrap(build())
if engine != "fsdp2":  # auto_wrap_policy: every adapter leaf is an FSDP1 unit of its own
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    results["adapter_leaf_units"] = sum(type(m.module).__name__ in ("LoraFactor", "TokenRows")
                                        for m in model.modules() if isinstance(m, FSDP))
results["sharded_vs_plain"] = (fwd(model) - expected).abs().max().item()


# The fused LoRA Linear (layers/fused.py) under the engine: FSDP2 takes it, reading the factors
# its block unit has gathered, and gives one process's gradients; FSDP1 gives every leaf its own
# unit, so the layer must keep calling the leaves (the fused path never runs there).
def gradients(m):
    m(input_ids=input_ids(), labels=input_ids()).loss.backward()
    return {n.replace("_fsdp_wrapped_module.", ""): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
            for n, p in m.named_parameters() if p.requires_grad}


with counting_fused_calls() as fused_calls:
    plain_grads = gradients(build())
results["fused_calls_plain"] = len(fused_calls)
with counting_fused_calls() as fused_calls:
    sharded_grads = gradients(wrap(build()))
results["fused_calls_sharded"] = len(fused_calls)
if engine == "fsdp2":
    assert sorted(sharded_grads) == sorted(plain_grads), sorted(set(sharded_grads) ^ set(plain_grads))
    results["fused_grads_vs_plain"] = max((sharded_grads[n] - plain_grads[n]).abs().max().item() for n in plain_grads)
    results["grad_scale"] = max(g.abs().max().item() for g in plain_grads.values())

# collective save: every rank calls, rank 0 writes; peft (on rank 0) reproduces the plain logits
da.save_adapter(model, os.path.join(out_dir, "adapter"))
results["saved_files"] = sorted(os.listdir(os.path.join(out_dir, "adapter")))

# merge / unmerge under the engine
da.merge(model)
results["merged_vs_plain"] = (fwd(model) - expected).abs().max().item()
results["merged_flags"] = merged_flags(model)
merged = full_base_weights(model)
assert sorted(merged) == sorted(merged_target), sorted(set(merged) ^ set(merged_target))
results["merged_weights_vs_expected"] = max((merged[n] - merged_target[n]).abs().max().item() for n in merged)
results["merge_delta"] = max((merged_target[n] - base_weights[n]).abs().max().item() for n in merged)
da.unmerge(model)
results["unmerged_vs_plain"] = (fwd(model) - expected).abs().max().item()
results["unmerged_flags"] = merged_flags(model)
unmerged = full_base_weights(model)
results["unmerged_weight_diff"] = max((unmerged[n] - base_weights[n]).abs().max().item() for n in unmerged)

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

# DoRA: merge / unmerge under the engine keep one process's logits
def build_dora():
    model = tiny_llama(tie=True)
    da.inject(model, da.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_trainable(model)
    return model


dora_expected = fwd(build_dora())
dora = wrap(build_dora())
results["dora_logits"] = (fwd(dora) - dora_expected).abs().max().item()
da.merge(dora)
results["dora_merged"] = (fwd(dora) - dora_expected).abs().max().item()
results["dora_merge_moves"] = max((w - base_weights[n]).abs().max().item() for n, w in full_base_weights(dora).items()
                                  if n in base_weights and "layers.0.self_attn.q_proj" in n)
da.unmerge(dora)
results["dora_unmerged"] = (fwd(dora) - dora_expected).abs().max().item()

if engine == "fsdp1_orig":  # FSDP1 keeps biases in frozen flat parameters: bias='all' is refused by name
    from helpers import tiny_gpt2

    biased = wrap(da.inject(tiny_gpt2(), da.LoraConfig(r=4, target_modules=["c_attn"], bias="all")))
    try:
        da.save_adapter(biased, os.path.join(out_dir, "biased"))
        results["refused_bias"] = None
    except NotImplementedError as exc:
        results["refused_bias"] = str(exc)

if rank == 0:
    with open(result_file, "w") as fh:
        json.dump(results, fh)
leave_process_group()
