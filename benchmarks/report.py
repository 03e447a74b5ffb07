"""What the benchmark scripts share: timing on CPU or CUDA, min/median/max, and one JSON line per
result for ``make benchmark`` (benchmarks/run_all.py collects them into benchmarks/results.md).

A script calls ``emit(...)`` for every ratio it prints; the line goes to the file named by the
environment variable ``DA_BENCH_RESULTS`` when it is set (by run_all.py), and nowhere otherwise.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    lo, med, hi = spread(values)
    return f"{med:.{digits}f} ({lo:.{digits}f} / {med:.{digits}f} / {hi:.{digits}f})"


def timer(device: str) -> Callable[[Callable[[], None], int], float]:
    """``time(fn, iters)``: seconds per call of ``fn``. CUDA: CUDA events around the calls."""
    if device.startswith("cuda"):
        import torch

        def time_cuda(fn, iters: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        return time_cuda

    def time_cpu(fn, iters: int) -> float:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    return time_cpu


def emit(benchmark: str, row: str, ratios: Sequence[float], target: Optional[str], detail: str,
         command: str) -> None:
    """Record one ratio row (ours / reference per round) for benchmarks/results.md."""
    path = os.environ.get("DA_BENCH_RESULTS")
    if not path:
        return
    lo, med, hi = spread(ratios)
    line = {"benchmark": benchmark, "row": row, "min": lo, "median": med, "max": hi, "rounds": len(ratios),
            "target": target, "detail": detail, "command": command}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
