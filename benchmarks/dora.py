"""fwd+bwd of one DoRA Linear: dist_adapters vs peft's ``use_dora=True``, each in its own
subprocess, interleaved over rounds (and a frozen Linear alone, the floor).

Default shape (issue 19's): Linear 4096 x 4096, r=16, input 8 x 128 x 4096 requiring grad (as
inside a network), fp32. peft builds B @ A (out x in, through an in x in identity) for the weight
norm in every forward; ours computes the norm from |W|^2 (cached), W A^T and A A^T.
Prints, per side, the median time per fwd+bwd and the peak memory above the frozen layer's
resident memory (VmHWM, glibc's mmap threshold fixed so freed blocks return to the system),
then ours/peft: the whole step's time, the time above the frozen layer's, and the memory above it.

    python benchmarks/dora.py [--features 4096 --rank 16 --tokens 1024 --rounds 5 --iters 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sides import measure_fwd_bwd, report, run_rounds  # noqa: E402


def run_side(side: str, args) -> dict:
    """In this process: build the layer, adapt it, time ``args.iters`` fwd+bwd, measure memory."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(args.features, args.features, bias=False))
    model.requires_grad_(False)
    config = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=["proj"], use_dora=True)
    if side == "dist_adapters":
        import dist_adapters as da

        da.inject(model, da.LoraConfig(**config))
    elif side == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**config))
    x = torch.randn(args.tokens // 128, 128, args.features, requires_grad=True)
    return measure_fwd_bwd(model, x, args.iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return
    got = run_rounds(__file__, args.rounds)
    report(got, f"DoRA Linear {args.features} x {args.features}, r={args.rank}, {args.tokens} tokens, fp32; "
                f"{args.rounds} rounds x {args.iters} iters, one subprocess per side and round", 0.7, 0.25,
           "dora", "python benchmarks/dora.py")


if __name__ == "__main__":
    main()
