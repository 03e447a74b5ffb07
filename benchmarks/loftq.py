"""LoftQ initialisation of one weight: dist_adapters vs peft's ``loftq_init``, same process.

For each matrix size and iteration count: time and relative error ||W - (Q + s*B@A)|| / ||W||
of ours (``loftq_factors``, nf4, block-Krylov randomized SVD warm-started across iterations)
and of peft 0.21's ``loftq_init`` (nf4 through bitsandbytes, a full ``torch.linalg.svd`` per
iteration). peft hard-codes a CUDA/XPU device; here its function is recompiled from its own
source with that one line set to "cpu" (nothing else changes, and only inside this script).
lora_alpha == r (scaling 1), the only case where peft's factors are correctly scaled.

W is Gaussian (std 0.02) plus a low-rank part with a power-law spectrum, as trained weights
have; the plain nf4 error is printed as the baseline both must beat. Runs alternate (ours, peft)
per repeat; the median is reported. Prints ours/peft time (target <= 0.3 at equal or lower error).

    python benchmarks/loftq.py [--sizes 1024 4096 --iters 1 5 --rank 16 --repeats 3]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

from report import emit

import torch


def peft_loftq_init_on_cpu():
    from peft.utils import loftq_utils

    src = inspect.getsource(loftq_utils.loftq_init)
    needle = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    if needle not in src:
        raise SystemExit("peft's loftq_init changed: the CPU patch in this benchmark no longer applies")
    namespace = dict(vars(loftq_utils))
    exec(compile(src.replace(needle, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def make_weight(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g) * 0.02
    k = 64  # a low-rank structured part: singular values 0.02 * sqrt(n) / (i + 1)
    u = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = 0.02 * n ** 0.5 / torch.arange(1, k + 1, dtype=torch.float32)
    return w + (u * s) @ v.T


def rel(w: torch.Tensor, approx: torch.Tensor) -> float:
    return ((w - approx).norm() / w.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="repeats per case for sizes < 4096 (4096: 1)")
    args = ap.parse_args()

    import peft

    from dist_adapters.init.loftq import loftq_factors, quantize_dequantize

    peft_init = peft_loftq_init_on_cpu()
    print(f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, "
          f"r={args.rank}, nf4, lora_alpha = r")
    rows = []
    for n in args.sizes:
        w = make_weight(n)
        e_nf4 = rel(w, quantize_dequantize(w, 4))
        for iters in args.iters:
            times = {"ours": [], "peft": []}
            errs = {}
            for _ in range(args.repeats if n < 4096 else 1):
                t = time.perf_counter()
                q, a, b = loftq_factors(w, args.rank, bits=4, iters=iters, scaling=1.0)
                times["ours"].append(time.perf_counter() - t)
                errs["ours"] = rel(w, q + b @ a)
                t = time.perf_counter()
                q, a, b = peft_init(w, num_bits=4, reduced_rank=args.rank, num_iter=iters)
                times["peft"].append(time.perf_counter() - t)
                errs["peft"] = rel(w, q + b @ a)
            ours, theirs = statistics.median(times["ours"]), statistics.median(times["peft"])
            rows.append((n, iters, ours, theirs, errs["ours"], errs["peft"], e_nf4))
            emit("loftq", f"LoftQ init {n}x{n}, {iters} iters: time ours/peft",
                 [o / p for o, p in zip(times["ours"], times["peft"])], "<= 0.3",
                 f"error ours/peft {errs['ours'] / errs['peft']:.5f}", "python benchmarks/loftq.py")
            print(f"{n}x{n} iters={iters}: ours {ours:8.3f} s  peft {theirs:8.3f} s  ratio {ours / theirs:.3f}   "
                  f"error ours {errs['ours']:.6f}  peft {errs['peft']:.6f}  ours/peft {errs['ours'] / errs['peft']:.5f}  "
                  f"(nf4 alone {e_nf4:.6f})", flush=True)
    print("\n| matrix | iters | ours s | peft s | ours/peft time | error ours | error peft | ours/peft error | nf4 alone |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, iters, ours, theirs, eo, ep, e0 in rows:
        print(f"| {n}x{n} | {iters} | {ours:.3f} | {theirs:.3f} | **{ours / theirs:.3f}** | {eo:.6f} | {ep:.6f} | "
              f"{eo / ep:.5f} | {e0:.6f} |")


if __name__ == "__main__":
    main()
