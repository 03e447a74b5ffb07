"""A plain DeepSpeed ZeRO-3 run saves only DeepSpeed's own checkpoint; `dist-adapters consolidate`
turns it into a PEFT adapter afterwards. Run with any launcher, e.g.:

    torchrun --standalone --nproc_per_node 2 examples/deepspeed_consolidate.py --out runs/ds
    dist-adapters inspect runs/ds/ckpt
    dist-adapters consolidate runs/ds/ckpt runs/ds/adapter

Rank 0 does the second step here too, through the Python function behind the command, and
checks that the consolidated adapter reproduces the trained model's logits.
"""

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cuda" if __import__("torch").cuda.is_available() else "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import dist_adapters as da  # noqa: E402
from dist_adapters.checkpoint.consolidate import consolidate  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/ds")
ap.add_argument("--steps", type=int, default=10)
args = ap.parse_args()

deepspeed.init_distributed()
rank = dist.get_rank()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
model = LlamaForCausalLM(cfg)
if rank == 0:
    model.save_pretrained(os.path.join(args.out, "base_model"))
config = da.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
da.inject(model, config)
if rank == 0:  # what peft's save_pretrained leaves next to a checkpoint; consolidate finds it
    config.save(args.out, base_model_name_or_path=os.path.abspath(os.path.join(args.out, "base_model")))
ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
             "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 3}}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

gen = torch.Generator().manual_seed(1000 + rank)
for step in range(1, args.steps + 1):
    start = torch.randint(0, 64, (4, 1), generator=gen)
    ids = (start + torch.arange(16)) % 64  # count upwards: an easy pattern to learn
    loss = engine(input_ids=ids.to(engine.device), labels=ids.to(engine.device)).loss
    engine.backward(loss)
    engine.step()
    if rank == 0:
        print(f"step {step} loss {loss.item():.4f}", flush=True)
engine.save_checkpoint(os.path.join(args.out, "ckpt"))  # DeepSpeed's own: latest + global_stepN/
probe = torch.arange(12).reshape(1, 12) % 64
engine.eval()
with torch.no_grad():
    trained = engine(input_ids=probe.to(engine.device)).logits.float().cpu()

if rank == 0:
    # overwrite: a rerun with the same --out replaces this example's own adapter (the CLI asks for --overwrite)
    done = consolidate(os.path.join(args.out, "ckpt"), os.path.join(args.out, "adapter"), quiet=True, overwrite=True)
    print(f"{done['format']}, {done['world_size']} ranks, tag {done['tag']}: {done['tensors']} tensors "
          f"-> {done['out']}")
    fresh = da.load_adapter(LlamaForCausalLM.from_pretrained(os.path.join(args.out, "base_model")),
                            os.path.join(args.out, "adapter")).eval()
    with torch.no_grad():
        diff = (fresh(input_ids=probe).logits - trained).abs().max().item()
    print(f"consolidated adapter vs the trained engine: max |logits diff| {diff:.2e}")
dist.barrier()
