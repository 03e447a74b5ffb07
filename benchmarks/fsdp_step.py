"""FSDP2 training step with LoRA: dist_adapters vs peft under the same sharding, 2 ranks.

Both models are the same Llama (built from a config, seed 0) with LoRA r=16 on every linear
layer, sharded the same way (``fully_shard`` per decoder layer, then the root) on one device mesh
in the same processes; their steps (forward, backward, AdamW) are interleaved round by round and
the median step time of each is compared. The bytes of gradient reduce-scattered per step are
counted at ``torch.distributed.reduce_scatter_single`` (FSDP2's gradient collective); with a frozen base they should be the
adapter's size, not the model's.

    python benchmarks/fsdp_step.py [--rounds 16 --steps 3 --hidden 512 --layers 4]
(launches itself under torchrun --standalone with 2 processes)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from report import emit


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import dist_adapters as da
    from dist_adapters.parallel import fsdp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counted = {"bytes": 0}
    original_rs = dist.reduce_scatter_single  # what FSDP2 calls for gradients (torch 2.13)

    def counting_reduce_scatter(output, input, *a, **kw):
        counted["bytes"] += input.numel() * input.element_size()
        return original_rs(output, input, *a, **kw)

    dist.reduce_scatter_single = counting_reduce_scatter

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                          num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                          attn_implementation="eager")
        return LlamaForCausalLM(cfg)

    ours = da.inject(build(), da.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    theirs = get_peft_model(build(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    fsdp.shard(ours)
    fsdp.shard(theirs.base_model.model)
    models = {"dist_adapters": ours, "peft": theirs}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    ids = torch.randint(0, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    n_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)  # global: DTensor numel
    n_total = sum(p.numel() for p in ours.parameters())

    def step(name):
        loss = models[name](input_ids=ids, labels=ids).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in models:  # warm-up
        step(name)
    times = {name: [] for name in models}
    reduced = {}
    for r in range(args.rounds):
        for name in (models if r % 2 == 0 else list(models)[::-1]):
            dist.barrier()
            counted["bytes"] = 0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            dist.barrier()
            times[name].append((time.perf_counter() - t0) / args.steps)
            reduced[name] = counted["bytes"] // args.steps
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"FSDP2, 2 ranks (gloo, CPU), Llama hidden={args.hidden} layers={args.layers} vocab=8000, "
              f"LoRA r=16 all-linear, batch {args.batch}x{args.seq} per rank, median of {args.rounds} rounds "
              f"x {args.steps} steps")
        for k, t in med.items():
            print(f"  {k:14s} {t * 1e3:9.1f} ms / step   gradient reduce-scattered per step (per rank): "
                  f"{reduced[k] / 2**20:.2f} MiB")
        print(f"  trainable {n_trainable * 4 / 2**20:.2f} MiB of a {n_total * 4 / 2**20:.1f} MiB fp32 model")
        print(f"ratio dist_adapters/peft = {med['dist_adapters'] / med['peft']:.3f} (target <= 1.0)")
        emit("fsdp_step", f"FSDP2 step, 2 ranks, Llama {args.hidden}x{args.layers}: time ours/peft",
             [o / p for o, p in zip(times["dist_adapters"], times["peft"])], "<= 1.0",
             f"reduce-scattered {reduced['dist_adapters'] / 2**20:.2f} MiB per step", "python benchmarks/fsdp_step.py")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--worker", *sys.argv[1:]]
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
