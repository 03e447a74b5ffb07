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
import statistics
import subprocess
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _rss_kb() -> int:
    return _status_kb("VmRSS")


def _peak_kb() -> int:
    """This process's own peak (VmHWM; ru_maxrss would carry the parent's over fork + exec,
    docs/field-notes.md)."""
    return _status_kb("VmHWM")


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
    with torch.no_grad():  # non-zero B: neither side may shortcut a zero product
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    x = torch.randn(args.tokens // 128, 128, args.features, requires_grad=True)

    def step():
        model(x).sum().backward()
        x.grad = None
        for p in model.parameters():
            p.grad = None

    step()  # warm-up
    before = _rss_kb()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    seconds = (time.perf_counter() - t0) / args.iters
    return {"seconds": seconds, "peak_above_kb": max(0, _peak_kb() - before)}


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
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    sides = ["frozen", "dist_adapters", "peft"]
    got: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(args.rounds):
        for side in sides:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True,
                                 text=True, env=env, check=True)
            got[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"DoRA Linear {args.features} x {args.features}, r={args.rank}, {args.tokens} tokens, fp32; "
          f"{args.rounds} rounds x {args.iters} iters, one subprocess per side and round")
    med = {}
    for side in sides:
        ts = [r["seconds"] for r in got[side]]
        mem = statistics.median(r["peak_above_kb"] for r in got[side]) / 1024
        med[side] = (statistics.median(ts), mem)
        print(f"  {side:14s} time min/median/max {min(ts) * 1e3:8.1f} / {med[side][0] * 1e3:8.1f} / "
              f"{max(ts) * 1e3:8.1f} ms   peak memory during fwd+bwd {mem:8.1f} MiB")
    rounds = list(zip(got["frozen"], got["dist_adapters"], got["peft"]))
    ratios = [o["seconds"] / p["seconds"] for _, o, p in rounds]
    above = [(o["seconds"] - f["seconds"]) / max(1e-9, p["seconds"] - f["seconds"]) for f, o, p in rounds]
    frozen_mem = med["frozen"][1]
    mem_ratio = (med["dist_adapters"][1] - frozen_mem) / max(1e-9, med["peft"][1] - frozen_mem)
    print(f"time ours/peft per round: min/median/max {min(ratios):.3f} / {statistics.median(ratios):.3f} / "
          f"{max(ratios):.3f} (target <= 0.7)")
    print(f"time above the frozen layer, ours/peft per round: min/median/max {min(above):.3f} / "
          f"{statistics.median(above):.3f} / {max(above):.3f}")
    print(f"memory above the frozen layer's own fwd+bwd, ours/peft: {mem_ratio:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
