"""What benchmarks/moe_lora.py and benchmarks/dora.py share: each side (frozen, dist_adapters,
peft) runs in its own subprocess, interleaved over rounds, and reports the time per fwd+bwd and
its peak memory above its own resident memory before the timed steps.

Memory: VmHWM (this process's own peak; ru_maxrss would carry the parent's over fork + exec,
docs/field-notes.md) minus VmRSS before the steps, with glibc's mmap threshold fixed so freed
blocks return to the system.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from report import emit

SIDES = ("frozen", "dist_adapters", "peft")


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def measure_fwd_bwd(model, x, iters: int) -> dict:
    """``measure`` of fwd+bwd of ``model`` on ``x`` (input gradient included), lora_B made
    non-zero first so that neither side may shortcut a zero product."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)

    def step():
        model(x).sum().backward()
        x.grad = None
        for p in model.parameters():
            p.grad = None

    return measure(step, iters)


def measure(step, iters: int) -> dict:
    """Time ``iters`` calls of ``step`` after one warm-up; the peak memory above the start."""
    step()
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    seconds = (time.perf_counter() - t0) / iters
    return {"seconds": seconds, "peak_above_kb": max(0, _status_kb("VmHWM") - before)}


def run_rounds(script: str, rounds: int) -> dict[str, list[dict]]:
    """``script`` (with this process's arguments and ``--side S``) per side and round."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    got: dict[str, list[dict]] = {s: [] for s in SIDES}
    for _ in range(rounds):
        for side in SIDES:
            out = subprocess.run([sys.executable, script, *sys.argv[1:], "--side", side], capture_output=True,
                                 text=True, env=env, check=True)
            got[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return got


def report(got: dict[str, list[dict]], what: str, time_target: float, memory_target: float,
           benchmark: str = "", command: str = "") -> None:
    """Per side min / median / max time and median memory; ours/peft per round (and above the
    frozen layer's time), and the memory above the frozen layer's, ours/peft."""
    print(what)
    med = {}
    for side in SIDES:
        ts = [r["seconds"] for r in got[side]]
        mem = statistics.median(r["peak_above_kb"] for r in got[side]) / 1024
        med[side] = mem
        print(f"  {side:14s} time min/median/max {min(ts) * 1e3:8.1f} / {statistics.median(ts) * 1e3:8.1f} / "
              f"{max(ts) * 1e3:8.1f} ms   peak memory during fwd+bwd {mem:8.1f} MiB")
    rounds = list(zip(got["frozen"], got["dist_adapters"], got["peft"]))
    ratios = [o["seconds"] / p["seconds"] for _, o, p in rounds]
    above = [(o["seconds"] - f["seconds"]) / max(1e-9, p["seconds"] - f["seconds"]) for f, o, p in rounds]
    mem_ratio = (med["dist_adapters"] - med["frozen"]) / max(1e-9, med["peft"] - med["frozen"])
    print(f"time ours/peft per round: min/median/max {min(ratios):.3f} / {statistics.median(ratios):.3f} / "
          f"{max(ratios):.3f} (target <= {time_target})")
    print(f"time above the frozen layer, ours/peft per round: min/median/max {min(above):.3f} / "
          f"{statistics.median(above):.3f} / {max(above):.3f}")
    print(f"memory above the frozen layer's own fwd+bwd, ours/peft: {mem_ratio:.3f} (target <= {memory_target})")
    if benchmark:
        emit(benchmark, f"{what.split(';')[0]}: time ours/peft", ratios, f"<= {time_target}", what, command)
        emit(benchmark, f"{what.split(';')[0]}: memory above the frozen layer ours/peft", [mem_ratio],
             f"<= {memory_target}", what, command)
