"""Run under torchrun (2 ranks): expert parallel (``parallel/expert.py``) on tiny MoE models with
LoRA on experts: each rank feeds its own tokens; logits, expert gradients, merge / unmerge and
the collective save against the same model in one process fed both ranks' tokens; and a rank
whose experts receive no token. Writes its measurements to the JSON file argv[2]."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist_adapters as da  # noqa: E402
from dist_adapters.parallel import expert  # noqa: E402
from dist_adapters.parallel.access import read_full  # noqa: E402
from helpers import leave_process_group, randomize_trainable  # noqa: E402
from test_moe import _config, tiny_moe  # noqa: E402

out_dir, result_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = expert.expert_mesh(world, torch.device("cpu"))
results = {}
IDS = [torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]


def built(family):
    model = da.inject(tiny_moe(family), da.LoraConfig(**_config(family)))
    randomize_trainable(model)
    return model


def loss_of(model, ids):
    logits = model(input_ids=ids).logits
    return logits, torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                     reduction="sum")


for family in ("qwen3_moe", "gpt_oss"):
    plain = built(family).train()
    ref_logits = []
    for ids in IDS:  # the one-process reference sees every rank's tokens, the loss summed
        logits, loss = loss_of(plain, ids)
        loss.backward()
        ref_logits.append(logits.detach())
    ref_grads = {n: p.grad.clone() for n, p in plain.named_parameters() if "experts" in n and p.grad is not None}

    model = copy.deepcopy(plain)
    model.zero_grad(set_to_none=True)
    layout = expert.parallelize_experts(model, mesh)
    logits, loss = loss_of(model, IDS[rank])
    loss.backward()
    results[f"{family}_logits"] = (logits.detach() - ref_logits[rank]).abs().max().item()
    experts_module = model.model.layers[1].mlp.experts
    results[f"{family}_local_experts"] = [experts_module.target_module.num_experts,
                                          list(experts_module.target_module.down_proj.to_local().shape)]
    # before the step's reduction an expert's gradient already holds every rank's tokens
    got = {n: read_full(p.grad) if expert._peft_shape(p) is None else p.grad.full_tensor().reshape(
        expert._peft_shape(p)) for n, p in model.named_parameters() if "experts" in n and p.grad is not None}
    results[f"{family}_grad_keys_equal"] = sorted(got) == sorted(ref_grads)
    results[f"{family}_grads"] = max((got[n] - ref_grads[n]).abs().max().item() /
                                     ref_grads[n].abs().max().item() for n in ref_grads)

    # merge / unmerge: the sharded experts get W + s B A of their own experts
    model.eval()
    plain.eval()
    with torch.no_grad():
        expected = plain(input_ids=IDS[rank]).logits
        before = read_full(experts_module.target_module.down_proj).clone()
        da.merge(model)
        results[f"{family}_merge_delta"] = (read_full(experts_module.target_module.down_proj) - before).abs().max().item()
        results[f"{family}_merged"] = (model(input_ids=IDS[rank]).logits - expected).abs().max().item()
        da.unmerge(model)
        results[f"{family}_unmerged"] = (model(input_ids=IDS[rank]).logits - expected).abs().max().item()

    # the collective save writes peft's full tensors
    saved = da.adapter_state_dict(model)
    if rank == 0:
        reference = da.adapter_state_dict(plain)
        results[f"{family}_saved_keys_equal"] = sorted(saved) == sorted(reference)
        results[f"{family}_saved"] = max((saved[k] - reference[k]).abs().max().item() for k in reference)
    # and a fresh sharded model loads them back
    fresh = built(family)
    for p in fresh.parameters():
        if p.requires_grad:
            torch.nn.init.zeros_(p)
    expert.parallelize_experts(fresh, mesh)
    path = os.path.join(out_dir, f"adapter_{family}")
    da.save_adapter(model, path)
    da.load_adapter(fresh, path)
    with torch.no_grad():
        results[f"{family}_loaded"] = (fresh.eval()(input_ids=IDS[rank]).logits - expected).abs().max().item()


# transformers' own expert parallel (experts over both ranks, frozen dense weights FSDP2), then
# our adapter, adopted: logits, merge / unmerge and the collective save against one process
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

base_dir = os.path.join(out_dir, "qwen3_moe_base")
if rank == 0:
    tiny_moe("qwen3_moe").save_pretrained(base_dir)
dist.barrier()
plain = built("qwen3_moe").eval()
plain_dir = os.path.join(out_dir, "hf_ep_adapter")
da.save_adapter(plain, plain_dir)
sharded = AutoModelForCausalLM.from_pretrained(base_dir, distributed_config=DistributedConfig(fsdp_size=world,
                                                                                             ep_size=world))
da.inject(sharded, da.LoraConfig(**_config("qwen3_moe")))
expert.adopt_experts(sharded)
da.load_adapter(sharded, plain_dir)  # the same adapter, loaded into the shards
hf_experts = sharded.model.layers[1].mlp.experts.target_module
results["hf_ep_local_experts"] = [hf_experts.num_experts, hf_experts._is_expert_parallel]
with torch.no_grad():
    expected = plain(input_ids=IDS[rank]).logits
    results["hf_ep_logits"] = (sharded.eval()(input_ids=IDS[rank]).logits - expected).abs().max().item()
    da.merge(sharded)
    results["hf_ep_merged"] = (sharded(input_ids=IDS[rank]).logits - expected).abs().max().item()
    da.unmerge(sharded)
    results["hf_ep_unmerged"] = (sharded(input_ids=IDS[rank]).logits - expected).abs().max().item()
saved = da.adapter_state_dict(sharded)
if rank == 0:
    reference = da.adapter_state_dict(plain)
    results["hf_ep_saved_keys_equal"] = sorted(saved) == sorted(reference)
    results["hf_ep_saved"] = max((saved[k] - reference[k]).abs().max().item() for k in reference)


def fixed_routing(hidden_states):
    """Every token to experts 0 and 1, which both live on rank 0."""
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
    return None, torch.full((tokens, 2), 0.5), torch.tensor([[0, 1]]).expand(tokens, 2)


model = built("qwen3_moe").train()
expert.parallelize_experts(model, mesh)
for layer in model.model.layers[1:]:  # layer 0 is dense
    layer.mlp.gate.forward = fixed_routing
loss_of(model, IDS[rank])[1].backward()  # rank 1's experts get no token: no hang, zero gradients
local = {n: p.grad.to_local().abs().max().item() for n, p in model.named_parameters()
         if "experts" in n and p.grad is not None}
results[f"no_token_rank{rank}_max_grad"] = max(local.values())
everything = [None] * world
dist.all_gather_object(everything, results)
if rank == 0:
    # a number: the largest over the ranks; anything else: rank 0's
    merged = {k: (max(part[k] for part in everything if k in part) if isinstance(v, float) else v)
              for part in reversed(everything) for k, v in part.items()}
    with open(result_file, "w") as fh:
        json.dump(merged, fh, indent=1)
leave_process_group()
