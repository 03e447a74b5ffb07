"""fwd+bwd of one LoRA Linear: dist_adapters vs peft, interleaved in one process.

Default shape (the issue's): base Linear 4096x4096, r=16, input 8x128 tokens, fp32, the input
requiring grad as it does inside a network. Each round times every implementation in turn
(interleaved, so drift in machine load hits all of them alike); the median over rounds is
reported. Prints ours/peft (target <= 1.0) and both overheads over a bare frozen nn.Linear.

    python benchmarks/lora_linear.py [--dim 4096 --rank 16 --batch 8 --seq 128 --rounds 7 --iters 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn


def build(dim: int, rank: int):
    torch.manual_seed(0)
    base = nn.Linear(dim, dim)
    for p in base.parameters():
        p.requires_grad_(False)

    import dist_adapters as da

    ours = da.inject(nn.Sequential(copy.deepcopy(base)), da.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                        target_modules=["0"]))
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(nn.Sequential(copy.deepcopy(base)),
                            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]))
    # non-zero B in both, so neither path can shortcut a zero product
    with torch.no_grad():
        for model in (ours, theirs):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    return {"bare nn.Linear": base, "dist_adapters": ours, "peft": theirs}


def step(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    out.sum().backward()
    x.grad = None
    for p in model.parameters():
        p.grad = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    models = build(args.dim, args.rank)
    x = torch.randn(args.batch, args.seq, args.dim, requires_grad=True)
    for model in models.values():  # warm-up
        step(model, x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(model, x)
            times[name].append((time.perf_counter() - t0) / args.iters)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"LoRA Linear {args.dim}x{args.dim}, r={args.rank}, input {args.batch}x{args.seq}, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds x {args.iters} iters")
    for name, t in med.items():
        print(f"  {name:15s} {t * 1e3:9.2f} ms / fwd+bwd")
    bare = med["bare nn.Linear"]
    print(f"  overhead over bare Linear: dist_adapters {100 * (med['dist_adapters'] / bare - 1):+.1f}%, "
          f"peft {100 * (med['peft'] / bare - 1):+.1f}%")
    print(f"ratio dist_adapters/peft = {med['dist_adapters'] / med['peft']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
