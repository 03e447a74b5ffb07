"""Run under torchrun (2 ranks): DoRA on a model built partitioned under ZeRO-3 (HfDeepSpeedConfig
+ zero.Init): the magnitudes start at the gathered weight's norms, the engine's logits equal one
process's, and merge / unmerge keep them; PiSSA on such a model (the residual written back into
the partitions). Writes measurements to argv[2] (JSON)."""

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
from helpers import input_ids, leave_process_group, tiny_llama  # noqa: E402

out_dir, result_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
base_dir = os.path.join(out_dir, "base_model")
if rank == 0:
    tiny_llama().save_pretrained(base_dir)
dist.barrier()
lora = dict(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False)
torch.manual_seed(3)
plain = da.inject(AutoModelForCausalLM.from_pretrained(base_dir), da.LoraConfig(**lora)).eval()
pissa = dict(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")
pissa_plain = da.inject(AutoModelForCausalLM.from_pretrained(base_dir), da.LoraConfig(**pissa))
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 - makes from_pretrained build partitioned
model = AutoModelForCausalLM.from_pretrained(base_dir)
results = {"partitioned": model.model.layers[0].self_attn.q_proj.weight.numel() == 0}
torch.manual_seed(3)
da.inject(model, da.LoraConfig(**lora))
magnitude = model.model.layers[0].mlp.down_proj.lora_magnitude_vector["default"].weight
results["magnitude_vs_plain"] = (magnitude - plain.model.layers[0].mlp.down_proj.lora_magnitude_vector[
    "default"].weight).abs().max().item()
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
engine.eval()
ids = input_ids()
with torch.no_grad():
    expected = plain(input_ids=ids).logits
    results["logits"] = (engine(input_ids=ids).logits - expected).abs().max().item()
    da.merge(engine)
    results["merged"] = (engine(input_ids=ids).logits - expected).abs().max().item()
    results["merged_flags"] = engine.module.model.layers[0].mlp.down_proj.merged_adapters == ["default"]
    da.unmerge(engine)
    results["unmerged"] = (engine(input_ids=ids).logits - expected).abs().max().item()

# PiSSA on a model built partitioned: each layer's weight gathered, factorised, the residual
# written back into the partitions; the same product and residual as on the plain model
model = AutoModelForCausalLM.from_pretrained(base_dir)
da.inject(model, da.LoraConfig(**pissa))
layer, reference = model.model.layers[1].mlp.down_proj, pissa_plain.model.layers[1].mlp.down_proj
params = [layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
with deepspeed.zero.GatheredParameters(params):  # DeepSpeed's own gather, not ours
    residual, a, b = (p.detach().clone() for p in params)
results["pissa_partitioned"] = model.model.layers[1].mlp.down_proj.base_layer.weight.numel() == 0
results["pissa_residual"] = (residual - reference.base_layer.weight).abs().max().item()
results["pissa_product"] = (b @ a - reference.lora_B["default"].weight @ reference.lora_A["default"].weight
                            ).abs().max().item()
results["pissa_moved"] = (b @ a).abs().max().item()

if rank == 0:
    with open(result_file, "w") as fh:
        json.dump(results, fh)
leave_process_group()
