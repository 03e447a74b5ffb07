"""fwd+bwd of one mixture-of-experts layer with LoRA on its experts: dist_adapters vs peft's
``target_parameters``, each in its own subprocess, interleaved over rounds.

Default shape (issue 18's): a Mixtral sparse-MoE block, E=16 experts, top-2, hidden 1024,
expert intermediate 1024, r=16, 8x128 tokens, fp32, the input requiring grad as inside a network.
The base experts run transformers' default ``grouped_mm`` implementation under both.
Prints, per side, the median time per fwd+bwd and the peak memory above the frozen layer (peak
resident memory during the steps minus resident memory before them, glibc's mmap threshold
fixed so freed blocks return to the system), then ours/peft for both (targets: time <= 0.7,
memory <= 0.25).

    python benchmarks/moe_lora.py [--experts 16 --hidden 1024 --inter 1024 --rank 16 --tokens 1024 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sides import measure_fwd_bwd, report, run_rounds  # noqa: E402


def run_side(side: str, args) -> dict:
    """In this process: build the block, adapt it, time ``args.iters`` fwd+bwd, measure memory."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_local_experts=args.experts,
                           num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config)
    torch.nn.init.normal_(block.experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(block.experts.down_proj, std=0.02)
    for p in block.parameters():
        p.requires_grad_(False)
    model = torch.nn.Sequential(block)
    targets = ["gate_up_proj", "down_proj"]
    if side == "dist_adapters":
        import dist_adapters as da

        da.inject(model, da.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=[],
                                       target_parameters=targets))
    elif side == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=[],
                                                 target_parameters=targets))
    x = torch.randn(args.tokens // 128, 128, args.hidden, requires_grad=True)
    return measure_fwd_bwd(model, x, args.iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=1024)
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
    report(got, f"MoE block E={args.experts} top-2, hidden {args.hidden}, intermediate {args.inter}, r={args.rank}, "
                f"{args.tokens} tokens, fp32; {args.rounds} rounds x {args.iters} iters, one subprocess per side and "
                "round", 0.7, 0.25, "moe_lora", "python benchmarks/moe_lora.py")


if __name__ == "__main__":
    main()
