"""Run under torchrun (2 ranks): a model built partitioned under ZeRO-3 (HfDeepSpeedConfig +
zero.Init), LoRA + trainable tokens injected into it, deepspeed.initialize, then save / merge /
unmerge. Writes measurements to argv[2] (JSON); the test asserts on them and checks peft."""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

import dist_adapters as da  # noqa: E402
from helpers import counting_fused_calls, input_ids, leave_process_group  # noqa: E402

out_dir, result_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 - makes from_pretrained build partitioned
model = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "base_model"))
q = model.model.layers[0].self_attn.q_proj.weight
results = {"partitioned_shape": list(q.shape), "ds_shape": list(q.ds_shape)}
da.inject(model, da.LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[3, 5, 100],
                               init_lora_weights=False))
emb = model.model.embed_tokens
# the rows as saved on disk, not through any gather of ours
from safetensors.torch import load_file  # noqa: E402

true_rows = load_file(os.path.join(out_dir, "base_model", "model.safetensors"))["model.embed_tokens.weight"][[3, 5, 100]]
results["token_rows_init_diff"] = (emb.trainable_tokens_delta["default"].weight - true_rows).abs().max().item()
results["lora_A_shape"] = list(model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
ids = input_ids()
# ZeRO-3 gathers each leaf around its own forward (hooks): a LoRA layer must call its leaves,
# never take the fused path (layers/fused.py), which would read unfetched factors
with counting_fused_calls() as fused_calls:
    for _ in range(2):  # train a little so the adapter is not at its init
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
results["fused_calls"] = len(fused_calls)
engine.eval()
with torch.no_grad():
    expected = engine(input_ids=ids).logits
torch.save(expected, os.path.join(out_dir, f"logits_rank{rank}.pt"))
da.save_adapter(engine, os.path.join(out_dir, "adapter"))
layer = engine.module.model.layers[1].mlp.down_proj
base_q, factors = layer.base_layer.weight, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
with deepspeed.zero.GatheredParameters([base_q, *factors]):  # DeepSpeed's own gather, not ours
    before_merge = base_q.detach().clone()
    target = before_merge + layer.scaling["default"] * (factors[1] @ factors[0])
da.merge(engine)
with torch.no_grad():
    results["merged_vs_unmerged"] = (engine(input_ids=ids).logits - expected).abs().max().item()
results["merged_flags"] = layer.merged_adapters == ["default"]
with deepspeed.zero.GatheredParameters([base_q]):
    results["merge_changed_weight"] = (target - before_merge).abs().max().item()
    results["merged_weight_vs_expected"] = (base_q - target).abs().max().item()
da.unmerge(engine)
results["unmerged_flags"] = layer.merged_adapters == []
with deepspeed.zero.GatheredParameters([base_q]):
    results["unmerged_weight_diff"] = (base_q - before_merge).abs().max().item()
with torch.no_grad():
    results["unmerged_vs_before"] = (engine(input_ids=ids).logits - expected).abs().max().item()
# adapter weights written after initialize survive the next optimizer step (fp32 master updated):
# load a different adapter (halved), step with lr=0, the outputs must stay the loaded ones
if rank == 0:
    from safetensors.torch import load_file, save_file
    import shutil

    shutil.copytree(os.path.join(out_dir, "adapter"), os.path.join(out_dir, "halved"), dirs_exist_ok=True)
    halved = {k: v * 0.5 for k, v in load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors")).items()}
    save_file(halved, os.path.join(out_dir, "halved", "adapter_model.safetensors"))
dist.barrier()
da.load_adapter(engine, os.path.join(out_dir, "halved"))
with torch.no_grad():
    loaded = engine(input_ids=ids).logits
results["halved_differs"] = (loaded - expected).abs().max().item()
for group in engine.optimizer.param_groups:
    group["lr"] = 0.0
engine.train()
engine.backward(engine(input_ids=ids, labels=ids).loss)
engine.step()
engine.eval()
with torch.no_grad():
    results["after_step_vs_loaded"] = (engine(input_ids=ids).logits - loaded).abs().max().item()
# unload: merge under the ZeRO-3 gather and put the base layers back; the engine keeps running
engine.eval()
with torch.no_grad():
    before_unload = engine(input_ids=ids).logits
da.unload(engine, merge=True)
with torch.no_grad():
    results["unloaded_vs_before"] = (engine(input_ids=ids).logits - before_unload).abs().max().item()
results["unloaded_has_lora"] = any("lora_" in n for n, _ in engine.module.named_parameters())
if rank == 0:
    with open(result_file, "w") as fh:
        json.dump(results, fh)
leave_process_group()
