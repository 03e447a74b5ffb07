"""Run under torchrun (2 ranks): a collective save gathers the adapter only, never the frozen model.

    save_memory.py ENGINE RESULT_JSON        ENGINE: fsdp1 | fsdp2 | zero3

A Llama of ~45M frozen parameters (180 MB fp32, 90 MB per rank once sharded) with a 0.26 MB
LoRA. The peak resident memory of each rank is measured during ``da.save_adapter`` (VmHWM,
reset through /proc/self/clear_refs), and, as the positive control that shows the measurement
sees a gather, during the engine's own full gather of the model (torch's full state dict, or
DeepSpeed's GatheredParameters over every parameter). Run with MALLOC_MMAP_THRESHOLD_ set low,
so that freed tensors leave the process and resident memory tracks live tensors.
"""

import gc
import json
import os
import re
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import dist_adapters as da  # noqa: E402
from helpers import leave_process_group  # noqa: E402

engine, result_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()


def vm(kind: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        return int(re.search(rf"{kind}:\s+(\d+) kB", fh.read()).group(1)) * 1024


def growth(action) -> int:
    """Peak resident bytes above the level before ``action`` (the largest over the ranks)."""
    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size
    before = vm("VmRSS")
    action()
    peak = torch.tensor([vm("VmHWM") - before])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return int(peak.item())


torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, attn_implementation="eager")
model = LlamaForCausalLM(cfg)
da.inject(model, da.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
out = os.path.join(os.path.dirname(result_file), f"adapter_{engine}")

if engine == "fsdp2":
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dist_adapters.parallel.fsdp import shard

    model = shard(model)

    def full_gather():
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
elif engine == "fsdp1":
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from dist_adapters.parallel.fsdp import auto_wrap_policy

    model = FSDP(model, auto_wrap_policy=auto_wrap_policy(model), device_id=torch.device("cpu"))

    def full_gather():
        with FSDP.summon_full_params(model, writeback=False):
            pass
else:
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    params = [p for p in model.parameters() if p.requires_grad]
    model, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.1), config=config)

    def full_gather():
        with deepspeed.zero.GatheredParameters(list(model.module.parameters())):
            pass
gc.collect()
results = {"frozen_bytes": frozen, "adapter_bytes": adapter, "rss_after_sharding": vm("VmRSS"),
           # the state-dict gather alone: the verification probe (an eval forward, gathering unit by
           # unit as training does) is left out of this measurement
           "save_growth": growth(lambda: da.save_adapter(model, out, probe=False)),
           "full_gather_growth": growth(full_gather)}
if rank == 0:
    with open(result_file, "w", encoding="utf-8") as fh:
        json.dump(results, fh)
leave_process_group()
