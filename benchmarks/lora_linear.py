"""fwd+bwd of one LoRA Linear: dist_adapters (fused and unfused) vs peft, interleaved in one process.

Default shape (issue 21's): base Linear 4096x4096, r=16, input 8x128 tokens requiring grad (as in
a middle layer), fp32 on CPU. Every round times each implementation in turn (the order alternates,
so drift in machine load hits all alike); ratios are taken per round and reported as median
(min / median / max). Both ``lora_dropout=0`` and ``0.1`` are run. Also reported: the bytes each
layer saves for backward (saved-tensor hooks; parameters and the layer's input excluded, as
every layer keeps those anyway), so ours <= peft's is checked on the real autograd graph.

    python benchmarks/lora_linear.py [--dim 4096 --rank 16 --batch 8 --seq 128 --rounds 7 --iters 3]
    python benchmarks/lora_linear.py --device cuda       # bf16 base, fp32 factors, CUDA events
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from report import emit, fmt, timer

COMMAND = "python benchmarks/lora_linear.py"


def build(dim: int, rank: int, dropout: float, device: str, dtype: torch.dtype) -> dict:
    import dist_adapters as da
    from dist_adapters.layers.lora import set_fused
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(dim, dim).to(device=device, dtype=dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    kw = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": dropout, "target_modules": ["0"]}
    ours = da.inject(nn.Sequential(copy.deepcopy(base)), da.LoraConfig(**kw))
    unfused = copy.deepcopy(ours)
    set_fused(unfused, False)
    theirs = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(**kw))
    with torch.no_grad():  # non-zero B everywhere, so no path can shortcut a zero product
        for model in (ours, unfused, theirs):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=torch.Generator(device).manual_seed(1))
    return {"bare nn.Linear": base, "dist_adapters": ours, "dist_adapters unfused": unfused, "peft": theirs}


def step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()
    x.grad = None
    for p in model.parameters():
        p.grad = None


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward, parameters and x excluded."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    x.grad = None
    for p in model.parameters():
        p.grad = None
    return sum(seen.values())


def run(args, dropout: float, dtype: torch.dtype) -> None:
    models = build(args.dim, args.rank, dropout, args.device, dtype)
    x = torch.randn(args.batch, args.seq, args.dim, device=args.device, dtype=dtype, requires_grad=True)
    for model in models.values():
        model.train()
        step(model, x)  # warm-up
    time_it = timer(args.device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            times[name].append(time_it(lambda: step(models[name], x), args.iters))
    ratio = lambda a, b: [ta / tb for ta, tb in zip(times[a], times[b])]  # noqa: E731
    over_ours = [t - 1 for t in ratio("dist_adapters", "bare nn.Linear")]
    over_peft = [t - 1 for t in ratio("peft", "bare nn.Linear")]
    vs_peft = ratio("dist_adapters", "peft")
    fused_vs_unfused = ratio("dist_adapters", "dist_adapters unfused")
    saved = {name: saved_bytes(m, x) for name, m in models.items() if name != "bare nn.Linear"}
    shape = f"{args.dim}x{args.dim} r={args.rank} dropout={dropout} {str(dtype)[6:]} {args.device}"
    print(f"LoRA Linear {shape}, input {args.batch}x{args.seq}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.iters} iters; ms per fwd+bwd, median (min / median / max):")
    for name, ts in times.items():
        print(f"  {name:22s} {fmt([t * 1e3 for t in ts], 2)}")
    print(f"  overhead over bare Linear: dist_adapters {fmt([100 * o for o in over_ours], 1)} %, "
          f"peft {fmt([100 * o for o in over_peft], 1)} %  (target <= 3 %)")
    added = [o / p for o, p in zip(over_ours, over_peft) if p > 0]
    print(f"  LoRA's added time, dist_adapters/peft: {fmt(added) if added else 'n/a'}")
    print("  saved for backward (KiB, beyond params and input): "
          + ", ".join(f"{n} {b / 1024:.0f}" for n, b in saved.items()))
    print(f"ratio ours/peft = {fmt(vs_peft)} (target <= 0.92); fused/unfused = {fmt(fused_vs_unfused)}")
    label = f"LoRA Linear {args.dim}², r={args.rank}, dropout {dropout}"
    emit("lora_linear", f"{label}: time ours/peft", vs_peft, "<= 0.92", shape, COMMAND)
    emit("lora_linear", f"{label}: overhead over bare Linear, ours (fraction)", over_ours, "<= 0.03", shape, COMMAND)
    emit("lora_linear", f"{label}: overhead over bare Linear, peft (fraction)", over_peft, None, shape, COMMAND)
    emit("lora_linear", f"{label}: LoRA added time ours/peft", added or [float("nan")], None, shape, COMMAND)
    emit("lora_linear", f"{label}: fused/unfused", fused_vs_unfused, None, shape, COMMAND)
    emit("lora_linear", f"{label}: bytes saved for backward ours/peft",
         [saved["dist_adapters"] / max(saved["peft"], 1)], "<= 1.0",
         f"{saved['dist_adapters']} vs {saved['peft']} bytes", COMMAND)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 base, fp32 factors)")
    ap.add_argument("--dropout", type=float, nargs="*", default=[0.0, 0.1])
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    for dropout in args.dropout:
        run(args, dropout, dtype)


if __name__ == "__main__":
    main()
