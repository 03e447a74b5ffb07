"""Run under torchrun (2 ranks): DTensor tensor parallel (``parallel/tensor.py``) on a tiny Llama
with LoRA + trainable tokens: forward, gradients, grad norm, merge / unmerge, collective save and
load against the same model in one process. Writes its measurements to the JSON file argv[2]."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist_adapters as da  # noqa: E402
from dist_adapters.parallel import tensor  # noqa: E402
from dist_adapters.parallel.access import read_full  # noqa: E402
from dist_adapters.parallel.dtensor import is_dtensor  # noqa: E402
from helpers import (expected_merged, input_ids, leave_process_group, merged_flags,  # noqa: E402
                     randomize_trainable, tiny_llama)

out_dir, result_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
results = {}


def build(tie: bool):
    model = tiny_llama(tie=tie)
    da.inject(model, da.LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[3, 5, 100]))
    randomize_trainable(model)
    return model


def loss_of(model):
    ids = input_ids(seed=7)
    logits = model(input_ids=ids).logits
    return logits, torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def full(p):
    """A parameter's full value through torch's own gather (norms outside the plan are plain)."""
    return p.full_tensor() if is_dtensor(p) else p


def grads(model):
    return {n: read_full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}


for tie in (False, True):
    tag = "tied" if tie else "untied"
    plain = build(tie).train()
    ref_logits, ref_loss = loss_of(plain)
    ref_loss.backward()
    ref_grads = grads(plain)
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()])).item()

    model = tensor.parallelize(build(tie).train())
    placements = {n: str(p.placements) for n, p in model.named_parameters() if p.requires_grad}
    logits, loss = loss_of(model)
    loss.backward()
    got = grads(model)
    results[f"{tag}_logits"] = (logits.detach() - ref_logits.detach()).abs().max().item()
    results[f"{tag}_grad_keys_equal"] = sorted(got) == sorted(ref_grads)
    results[f"{tag}_grads"] = max((got[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    results[f"{tag}_grad_norm"] = abs(tensor.grad_norm(model.parameters()).item() - ref_norm)
    results[f"{tag}_placements"] = {k: v for k, v in placements.items() if "layers.0." in k or "embed" in k}
    # the base really is sharded: a rank holds half of a column-parallel weight
    q = model.model.layers[0].self_attn.q_proj.base_layer.weight
    results[f"{tag}_q_local_shape"] = list(q.to_local().shape)
    if tie:
        results["tie_kept"] = model.lm_head.base_layer.weight is model.model.embed_tokens.base_layer.weight

    # merge / unmerge under TP (gather of each layer's slices, written back into them)
    model.eval()
    plain.eval()
    with torch.no_grad():
        expected = plain(input_ids=input_ids()).logits
        base = {n: p.detach().clone() for n, p in plain.named_parameters() if not p.requires_grad}
        target = expected_merged(plain, [3, 5, 100])
        da.merge(model)
        results[f"{tag}_merged"] = (model(input_ids=input_ids()).logits - expected).abs().max().item()
        results[f"{tag}_merged_flags"] = merged_flags(model)
        merged = {n: full(p) for n, p in model.named_parameters() if not p.requires_grad}
        results[f"{tag}_merged_keys_equal"] = sorted(merged) == sorted(target)
        results[f"{tag}_merge_delta"] = max((target[n] - base[n]).abs().max().item() for n in target)
        results[f"{tag}_merged_weights"] = max((merged[n] - target[n]).abs().max().item() for n in target)
        da.unmerge(model)
        results[f"{tag}_unmerged_flags"] = merged_flags(model)
        results[f"{tag}_unmerged"] = (model(input_ids=input_ids()).logits - expected).abs().max().item()
        results[f"{tag}_unmerged_weights"] = max((full(p) - base[n]).abs().max().item()
                                                 for n, p in model.named_parameters() if not p.requires_grad)

    # collective save (full PEFT tensors) and load (sharded back) into a fresh TP model
    path = os.path.join(out_dir, f"adapter_{tag}")
    da.save_adapter(model, path)
    fresh = build(tie)
    for p in fresh.parameters():
        if p.requires_grad:
            torch.nn.init.zeros_(p)
    fresh = tensor.parallelize(fresh.eval())
    da.load_adapter(fresh, path)
    with torch.no_grad():
        results[f"{tag}_loaded"] = (fresh(input_ids=input_ids()).logits - expected).abs().max().item()
    sd = da.adapter_state_dict(model)
    if rank == 0:
        plain_sd = da.adapter_state_dict(plain)
        results[f"{tag}_state_dict"] = max((sd[k] - plain_sd[k]).abs().max().item() for k in plain_sd)
        results[f"{tag}_state_dict_keys"] = sorted(sd) == sorted(plain_sd)

# DoRA over column- and row-parallel bases: the norm from this rank's rows (row-parallel: the
# sums of squares all-reduced), magnitudes placed with the output rows
def build_dora():
    model = tiny_llama()
    da.inject(model, da.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_trainable(model)
    return model


plain = build_dora().train()
ref_logits, ref_loss = loss_of(plain)
ref_loss.backward()
ref_grads = grads(plain)
model = tensor.parallelize(build_dora().train())
logits, loss = loss_of(model)
loss.backward()
got = grads(model)
results["dora_magnitude_placements"] = [
    str(model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.placements),
    str(model.model.layers[0].self_attn.o_proj.lora_magnitude_vector["default"].weight.placements)]
results["dora_logits"] = (logits.detach() - ref_logits.detach()).abs().max().item()
results["dora_grad_keys_equal"] = sorted(got) == sorted(ref_grads)
results["dora_grads"] = max((got[n] - ref_grads[n]).abs().max().item() / ref_grads[n].abs().max().item()
                            for n in ref_grads)
with torch.no_grad():
    expected = plain.eval()(input_ids=input_ids()).logits
    base_logits = da.unload(build_dora(), merge=False)(input_ids=input_ids()).logits
    da.merge(model.eval())
    results["dora_merged"] = (model(input_ids=input_ids()).logits - expected).abs().max().item()
    results["dora_merge_moves"] = (model(input_ids=input_ids()).logits - base_logits).abs().max().item()
    da.unmerge(model)
    results["dora_unmerged"] = (model(input_ids=input_ids()).logits - expected).abs().max().item()
sd, plain_sd = da.adapter_state_dict(model), da.adapter_state_dict(plain)
results["dora_state_dict"] = max((sd[k] - plain_sd[k]).abs().max().item() for k in plain_sd)
results["dora_state_dict_keys"] = sorted(sd) == sorted(plain_sd) and any("magnitude" in k for k in sd)

# a model transformers sharded itself (DistributedConfig(tp_size=2), Llama's base_model_tp_plan),
# our adapter injected, adopted (tensor.adopt) and loaded: logits, gradients, merge / unmerge, save
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

plain = build(False).train()
hf_dirs = [os.path.join(out_dir, "hf_base"), os.path.join(out_dir, "hf_adapter")]
if rank == 0:
    tiny_llama().save_pretrained(hf_dirs[0])
da.save_adapter(plain, hf_dirs[1])
dist.barrier()
model = AutoModelForCausalLM.from_pretrained(hf_dirs[0], distributed_config=DistributedConfig(tp_size=2))
da.inject(model, da.LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[3, 5, 100]))
tensor.adopt(model)
da.load_adapter(model, hf_dirs[1])
ref_logits, ref_loss = loss_of(plain)
ref_loss.backward()
ref_grads = grads(plain)
logits, loss = loss_of(model.train())
loss.backward()
got = grads(model)
results["hf_q_local_shape"] = list(model.model.layers[0].self_attn.q_proj.base_layer.weight.to_local().shape)
results["hf_logits"] = (logits.detach() - ref_logits.detach()).abs().max().item()
results["hf_grads"] = max((got[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
results["hf_grad_keys_equal"] = sorted(got) == sorted(ref_grads)
with torch.no_grad():
    expected = plain.eval()(input_ids=input_ids()).logits
    da.merge(model.eval())
    results["hf_merged"] = (model(input_ids=input_ids()).logits - expected).abs().max().item()
    da.unmerge(model)
    results["hf_unmerged"] = (model(input_ids=input_ids()).logits - expected).abs().max().item()
sd, plain_sd = da.adapter_state_dict(model), da.adapter_state_dict(plain)
results["hf_state_dict"] = max((sd[k] - plain_sd[k]).abs().max().item() for k in plain_sd)
results["hf_state_dict_keys"] = sorted(sd) == sorted(plain_sd)

# clipping across DTensor and plain gradients (torch's clip_grad_norm_ refuses the mix)
mixed = [torch.nn.Parameter(torch.ones(3))]
mixed[0].grad = torch.full((3,), 2.0)
model = tensor.parallelize(build(False).train())
loss_of(model)[1].backward()
params = [p for p in model.parameters() if p.grad is not None] + mixed
before = tensor.clip_grad_norm_(params, 0.5).item()
after = tensor.grad_norm(params).item()
results["clip_before"], results["clip_after"] = before, after

# a plan of the caller's: only the MLP is sharded (gate / up by columns, down by rows), attention whole
plain = build(False).eval()
plan = {"*.mlp.gate_proj": "colwise", "*.mlp.up_proj": "colwise", "*.mlp.down_proj": "rowwise"}
model = tensor.parallelize(build(False).eval(), plan=plan)
attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
results["plan_placements"] = [str(mlp.gate_proj.base_layer.weight.placements),
                              str(mlp.down_proj.base_layer.weight.placements),
                              str(mlp.up_proj.lora_B["default"].weight.placements),
                              str(attn.q_proj.lora_B["default"].weight.placements)]
results["plan_unsharded_is_plain"] = not is_dtensor(attn.q_proj.base_layer.weight)
with torch.no_grad():
    results["plan_logits"] = (model(input_ids=input_ids()).logits - plain(input_ids=input_ids()).logits).abs().max().item()

# what tensor parallel refuses, by name
for what, config in (("modules_to_save", da.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
                     ("bias", da.LoraConfig(r=4, target_modules=["q_proj"], bias="all"))):
    try:
        tensor.parallelize(da.inject(tiny_llama(attention_bias=True), config))
        results[f"refused_{what}"] = None
    except NotImplementedError as exc:
        results[f"refused_{what}"] = str(exc)

if rank == 0:
    with open(result_file, "w") as fh:
        json.dump(results, fh, indent=1)
leave_process_group()
