"""Run under torchrun (2 ranks): a 4-bit (nf4, quant_storage float32) base with LoRA under
FSDP1 / FSDP2 / ZeRO-3. Checks that the packed 4-bit weights are really sharded (each rank holds
half) and that forward, the adapter gradients and a collective save equal the unsharded
quantized model. argv: engine, base model dir, result JSON."""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dist_adapters as da  # noqa: E402
from dist_adapters.recipe.quantization import KEYS, load_quantized  # noqa: E402
from helpers import input_ids, leave_process_group, randomize_trainable  # noqa: E402

engine, base_dir, result_file = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")
rank = dist.get_rank()
Q = {**KEYS, "quant_storage": "float32"}
results = {}


def build():
    model = load_quantized(base_dir, Q, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    da.inject(model, da.LoraConfig(r=4, target_modules="all-linear"))
    randomize_trainable(model)
    return model


def loss_and_grads(model, forward):
    ids = input_ids(seed=5)
    logits = forward(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return logits.detach(), loss


plain = build().train()
ref_logits, ref_loss = loss_and_grads(plain, lambda ids: plain(input_ids=ids).logits)
ref_loss.backward()
ref_grads = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
packed = plain.model.layers[0].self_attn.q_proj.base_layer.weight
results["packed_dtype"] = str(packed.dtype)
full_numel = packed.numel()

model = build().train()
if engine == "fsdp2":
    from dist_adapters.parallel.fsdp import shard

    shard(model)
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight
    results["local_fraction"] = w.to_local().numel() / full_numel
    forward = model
elif engine == "fsdp1":
    from dist_adapters.parallel.fsdp import wrap_fsdp1

    model = wrap_fsdp1(model, torch.device("cpu"), use_orig_params=True)  # with_grads needs it
    # the block unit's flat parameter holds the packed weights; each rank keeps half of it
    block = next(m for n, m in model.named_modules() if n.endswith("layers.0") and hasattr(m, "_flat_param"))
    flat = block._flat_param
    results["packed_in_flat"] = any(f.endswith("q_proj.base_layer.weight") for f in flat._fqns)
    results["local_fraction"] = flat.numel() / flat._unpadded_unsharded_size.numel()
    forward = model
else:
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    params = [p for p in model.parameters() if p.requires_grad]
    model, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config=config)
    w = model.module.model.layers[0].self_attn.q_proj.base_layer.weight
    results["local_fraction"] = w.ds_tensor.numel() / w.ds_numel
    forward = model
logits, loss = loss_and_grads(model, lambda ids: forward(input_ids=ids).logits)
results["logits"] = (logits - ref_logits).abs().max().item()
if engine == "zero3":
    model.backward(loss)
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for n, p in model.module.named_parameters():
        if p.requires_grad:
            grads[n] = safe_get_full_grad(p)
else:
    loss.backward()
    from dist_adapters.names import clean_name
    from dist_adapters.parallel.access import read_full

    if engine == "fsdp1":
        # gradients of the adapter units, gathered unit by unit
        grads = {}
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, with_grads=True):
            grads = {clean_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    else:
        grads = {n: read_full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
results["grad_keys_equal"] = sorted(grads) == sorted(ref_grads)
results["grads"] = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads if n in grads)
sd = da.adapter_state_dict(model)
if rank == 0:
    ref_sd = da.adapter_state_dict(plain)
    results["saved"] = max((sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd)
    results["is_4bit"] = isinstance(plain.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    with open(result_file, "w") as fh:
        json.dump(results, fh, indent=1)
leave_process_group()
