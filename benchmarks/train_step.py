"""A whole training step (forward, backward, AdamW) of a Llama-shaped model with LoRA r=16 on every
linear layer: dist_adapters against peft, and dist_adapters unfused (``set_fused(model, False)``)
and compiled (each decoder layer, ``parallel.compile``) under ``none``.

Model: LlamaForCausalLM from a config (8 layers, hidden 1024, intermediate 2816, 16 heads, 4 KV
heads, vocab 32000), seed 0; global batch 4x256 tokens. Under ``none`` one process runs every
side, interleaved round by round (order alternating). Under ``fsdp2`` 2 ranks (torchrun,
1 thread each, 2x256 tokens each) shard both models the same way (``fully_shard`` per layer, then
the root) and run them interleaved. Ratios are per round; reported as median (min / median / max).

    python benchmarks/train_step.py [--strategy all|none|fsdp2 --rounds 9 --no-compile]
    python benchmarks/train_step.py --device cuda --strategy none     # bf16 base, CUDA events
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from report import emit, fmt, timer

COMMAND = "python benchmarks/train_step.py"


def build_models(args, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import dist_adapters as da

    def base():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                          num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                          attn_implementation="sdpa")
        return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)

    ours = da.inject(base(), da.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    theirs = get_peft_model(base(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():  # non-zero B on both sides (same values), so no product is skipped
        for model in (ours, theirs):
            gen = torch.Generator(device).manual_seed(1)
            for name, p in sorted(model.named_parameters()):
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=gen)
    return ours, theirs


def run_sides(args, sides: dict, ids, rank0: bool, label: str, barrier=lambda: None) -> dict:
    import torch

    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in sides.items()}

    def step(name):
        loss = sides[name](input_ids=ids, labels=ids).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in sides:  # warm-up (and the compile)
        step(name)
        step(name)
    time_it = timer(args.device)
    times = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            barrier()
            times[name].append(time_it(lambda: step(name), args.steps))
            barrier()
    if rank0:
        print(f"{label}: ms per step, median (min / median / max) over {args.rounds} rounds x {args.steps} steps")
        for name, ts in times.items():
            print(f"  {name:26s} {fmt([t * 1e3 for t in ts], 1)}")
    return times


def report(times: dict, a: str, b: str, row: str, target, detail: str) -> None:
    ratios = [x / y for x, y in zip(times[a], times[b])]
    of_medians = statistics.median(times[a]) / statistics.median(times[b])
    print(f"ratio {a} / {b} = {fmt(ratios)} per round, {of_medians:.3f} of the medians"
          + (f" (target {target})" if target else ""))
    emit("train_step", row, ratios, target, detail, COMMAND)


def single(args) -> None:
    import torch

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    ours, theirs = build_models(args, args.device, dtype)
    import copy

    from dist_adapters.layers.lora import set_fused

    unfused = copy.deepcopy(ours)
    set_fused(unfused, False)
    sides = {"dist_adapters": ours, "peft": theirs, "dist_adapters unfused": unfused}
    if not args.no_compile:
        from dist_adapters.parallel.compile import compile_blocks

        compiled = copy.deepcopy(ours)
        compile_blocks(compiled)
        sides["dist_adapters compiled"] = compiled
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    shape = (f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, LoRA r=16 all-linear, batch "
             f"{args.batch}x{args.seq}, {str(dtype)[6:]} {args.device}, {torch.get_num_threads()} threads")
    times = run_sides(args, sides, ids, True, f"none, {shape}")
    report(times, "dist_adapters", "peft", "train step, none: ours/peft", "<= 0.90", shape)
    report(times, "dist_adapters unfused", "peft", "train step, none: ours unfused/peft", None, shape)
    if "dist_adapters compiled" in times:
        report(times, "dist_adapters compiled", "peft", "train step, none: ours compiled/peft eager", None, shape)
        report(times, "dist_adapters compiled", "dist_adapters", "train step, none: ours compiled/ours eager",
               None, shape)


def fsdp2_worker(args) -> None:
    import torch
    import torch.distributed as dist

    from dist_adapters.parallel import fsdp

    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(device)
    args.device = device
    dtype = torch.bfloat16 if backend == "nccl" else torch.float32
    ours, theirs = build_models(args, device, dtype)
    fsdp.shard(ours)
    fsdp.shard(theirs.base_model.model)
    per_rank = args.batch // world
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids[rank * per_rank:(rank + 1) * per_rank].to(device)
    shape = (f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, LoRA r=16 all-linear, global batch "
             f"{args.batch}x{args.seq}, {str(dtype)[6:]}, {world} ranks ({backend}), "
             f"{torch.get_num_threads()} thread(s) each")
    times = run_sides(args, {"dist_adapters": ours, "peft": theirs}, ids, rank == 0, f"fsdp2@{world}, {shape}",
                      barrier=dist.barrier)
    if rank == 0:
        report(times, "dist_adapters", "peft", f"train step, fsdp2@{world}: ours/peft", "<= 0.95", shape)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strategy", choices=["all", "none", "fsdp2"], default="all")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 base, fp32 factors)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled side under none")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return fsdp2_worker(args)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.strategy in ("all", "none"):
        single(args)
    if args.strategy in ("all", "fsdp2"):
        argv = [a for a in sys.argv[1:] if a not in ("--strategy", "all", "none", "fsdp2")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), "--worker", *argv]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        rc = subprocess.call(cmd, env=env)
        if rc:
            sys.exit(rc)


if __name__ == "__main__":
    main()
