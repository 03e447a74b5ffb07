"""A raw torch training loop with the library API: inject LoRA, wrap in DDP, train, save a PEFT
adapter. Run with any launcher, e.g.:

    torchrun --standalone --nproc_per_node 2 examples/ddp_raw_loop.py --out runs/raw
"""

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaConfig, LlamaForCausalLM

import dist_adapters as da

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/raw")
ap.add_argument("--steps", type=int, default=20)
args = ap.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")

torch.manual_seed(0)  # same base model and adapter init on every rank
cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
model = LlamaForCausalLM(cfg)
if rank == 0:
    model.save_pretrained(os.path.join(args.out, "base_model"))
da.inject(model, da.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
model = DDP(model.to(device), device_ids=[device.index] if cuda else None)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own samples
for step in range(1, args.steps + 1):
    start = torch.randint(0, 64, (8, 1), generator=gen)
    ids = ((start + torch.arange(24)) % 64).to(device)  # count up: t+1 follows t
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # DDP all-reduces the adapter gradients only
    opt.step()
    opt.zero_grad(set_to_none=True)
    if rank == 0 and (step == 1 or step % 5 == 0):
        print(f"step {step:3d} loss {loss.item():.4f}", flush=True)

da.save_adapter(model, os.path.join(args.out, "adapter"))  # every rank calls, rank 0 writes
if rank == 0:
    print(f"adapter written to {os.path.join(args.out, 'adapter')} (world size {world})")
dist.destroy_process_group()
