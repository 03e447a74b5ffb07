"""Peak memory of one fwd+bwd+AdamW step with trainable tokens: dist_adapters vs peft's
TrainableTokens vs training the full embedding, each above a frozen-embedding baseline.

Model: Embedding(V=64000, d=512) -> Linear(d, d) (trainable in every variant, so the baseline
also runs backward and AdamW) -> mean square. k=16 trainable tokens, input 8x128 ids of which
every 8th is a trainable token. Each variant runs in its own subprocess (order interleaved over
rounds); memory is the process's peak RSS during the step minus its RSS just before it, and the
baseline's figure is subtracted. Prints MiB and the ratio ours/peft (target <= 0.05).

    python benchmarks/trainable_tokens_memory.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

from report import emit

V, D, K, BATCH, SEQ = 64000, 512, 16, 8, 128
VARIANTS = ("baseline", "dist_adapters", "peft", "full embedding")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str) -> int:
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(V, D)
            self.proj = nn.Linear(D, D)

        def get_input_embeddings(self):
            return self.embed_tokens

        def forward(self, ids):
            return self.proj(self.embed_tokens(ids)).square().mean()

    model = Model()
    tokens = list(range(1000, 1000 + K))
    if variant == "dist_adapters":
        import dist_adapters as da

        da.inject(model, da.TrainableTokensConfig(token_indices=tokens))
    elif variant == "peft":
        from peft import TrainableTokensConfig, get_peft_model

        model = get_peft_model(model, TrainableTokensConfig(token_indices=tokens, target_modules=["embed_tokens"]))
    elif variant == "baseline":
        model.embed_tokens.weight.requires_grad_(False)
    for p in model.proj.parameters() if variant != "peft" else model.base_model.model.proj.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, V, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ids[:, ::8] = torch.tensor(tokens).repeat(SEQ // 8 // K + 1)[: SEQ // 8]
    gc.collect()
    before = _rss_bytes()
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > before + (64 << 20):
        print("warning: set-up peaked above the step; figure may be low", file=sys.stderr)
    model(ids).backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps({"variant": args.variant, "step_bytes": run_variant(args.variant)}))
        return
    results: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            out = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True,
                                 text=True, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1])["step_bytes"])
    step = {v: min(xs) for v, xs in results.items()}  # min over rounds: least allocator noise
    extra = {v: step[v] - step["baseline"] for v in VARIANTS if v != "baseline"}
    mib = 1 << 20
    print(f"trainable tokens: V={V}, d={D}, k={K}, input {BATCH}x{SEQ}, one fwd+bwd+AdamW step, fp32 "
          f"(embedding {V * D * 4 / mib:.0f} MiB); peak RSS of the step, min of {args.rounds} rounds")
    print(f"  baseline (frozen embedding)    {step['baseline'] / mib:8.1f} MiB")
    for v, e in extra.items():
        print(f"  {v:30s} {step[v] / mib:8.1f} MiB   extra over baseline {e / mib:8.1f} MiB")
    ratio = extra["dist_adapters"] / extra["peft"]
    emit("trainable_tokens_memory", "trainable tokens: step memory above a frozen embedding ours/peft", [ratio],
         "<= 0.05", f"V={V}, d={D}, k={K}", "python benchmarks/trainable_tokens_memory.py")
    print(f"ratio extra dist_adapters/peft = {ratio:.4f} (target <= 0.05); "
          f"dist_adapters/full = {extra['dist_adapters'] / extra['full embedding']:.4f}")


if __name__ == "__main__":
    main()
