"""LoRA on a Megatron-core tensor-parallel MLP (ColumnParallelLinear -> gelu -> RowParallelLinear),
one TP rank per process; CPU + gloo, or CUDA + NCCL when GPUs are visible.

    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/megatron_lora.py --out runs/megatron_lora

Writes OUT/adapter (a PEFT directory of full tensors) and OUT/megatron_shards/mp_rank_NN (each TP
rank's local shards; ``read_megatron_shards`` rebuilds the full tensors offline).
"""

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")  # Megatron on CPU
from megatron.core import ModelParallelConfig, parallel_state  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402

import dist_adapters as da  # noqa: E402
from dist_adapters.checkpoint.megatron_shards import save_megatron_shards  # noqa: E402
parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/megatron_lora")
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
tp = dist.get_world_size()
parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32)


class MLP(nn.Module):
    def __init__(self, hidden=64, ffn=256):
        super().__init__()
        init = lambda w: nn.init.normal_(w, std=0.02)  # noqa: E731
        self.fc1 = ColumnParallelLinear(hidden, ffn, config=config, init_method=init, gather_output=False)
        self.fc2 = RowParallelLinear(ffn, hidden, config=config, init_method=init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):  # x: [sequence, batch, hidden], the same on every TP rank
        h, _ = self.fc1(x)
        y, _ = self.fc2(F.gelu(h))
        return y


torch.manual_seed(0)  # the same on every rank: Megatron draws full weights and slices them
model = MLP().to(device)
da.inject(model, da.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-2)
gen = torch.Generator().manual_seed(1)
x, target = torch.randn(16, 4, 64, generator=gen).to(device), torch.randn(16, 4, 64, generator=gen).to(device)
for step in range(args.steps):
    loss = F.mse_loss(model(x) * 10, target)  # identical on every TP rank: no loss all-reduce
    opt.zero_grad()
    loss.backward()
    opt.step()
    if dist.get_rank() == 0:
        print(f"step {step} loss {loss.item():.6f}")

da.save_adapter(model, os.path.join(args.out, "adapter"))  # collective: full tensors, rank 0 writes
save_megatron_shards(model, os.path.join(args.out, "megatron_shards"))  # collective: every TP rank writes
if dist.get_rank() == 0:
    local = sum(p.numel() for p in trainable)
    print(f"tp {tp}: {local} trainable parameters on rank 0, saved {args.out}/adapter and {args.out}/megatron_shards")
dist.destroy_process_group()
