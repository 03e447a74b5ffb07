"""`dist-adapters` entry point.

    dist-adapters train CONFIG.yaml [--set key=value ...]
    dist-adapters launch [--launcher L --nnodes N --node-rank R --master-addr A ...] -- SCRIPT ARGS
    dist-adapters loftq MODEL_DIR OUT [--bits 4 --rank 16 --iters 5 --alpha A ...]

Errors in the user's input (config, data, paths, hostfiles) print one line and exit 2, without a
traceback. Sub-commands `consolidate` and `inspect` come with their issue.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-adapters",
        description="Sharded LoRA / trainable-token fine-tuning with PEFT-format checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"dist-adapters {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="run the reference fine-tuning recipe",
                           description="Run the recipe; launches itself under torchrun when "
                                       "launch.nproc_per_node > 1 and no launcher started it.")
    train.add_argument("config", help="recipe YAML (see configs/demo.yaml)")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config keys, e.g. --set train.steps=10 train.lr=1e-3 (repeatable)")
    from .launch_cmd import add_parser as add_launch_parser

    add_launch_parser(sub)
    loftq = sub.add_parser("loftq", help="LoftQ-initialise a model directory (streamed, one tensor at a time)",
                           description="Quantize every targeted weight W of a safetensors model to Q and fit "
                                       "a LoRA adapter to W - Q. Writes OUT (the model with Q in place of W) "
                                       "and OUT/loftq_init (the PEFT adapter). MODEL_DIR is only read.")
    loftq.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory (safetensors)")
    loftq.add_argument("out", metavar="OUT", help="output directory")
    loftq.add_argument("--bits", type=int, default=4, help="2, 4 (nf4, default) or 8")
    loftq.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    loftq.add_argument("--iters", type=int, default=5, help="LoftQ alternations (default 5)")
    loftq.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank)")
    loftq.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                       help="module names or suffixes (default all-linear: every 2-D weight but "
                            "embeddings and the output head)")
    loftq.add_argument("--svd", choices=["auto", "exact", "randomized"], default="auto",
                       help="rank-r SVD: randomized block Krylov (auto: for matrices >= 1024) or full")
    loftq.add_argument("--quantizer", choices=["torch", "bnb"], default="torch",
                       help="nf quantizer: plain torch, or bitsandbytes' nf4 kernels (bits 4)")
    return parser


def cmd_loftq(args: argparse.Namespace) -> int:
    import os

    from .checkpoint.safetensors_stream import StreamError
    from .init.loftq import loftq_model_dir

    targets = args.target_modules
    targets = "all-linear" if targets == ["all-linear"] else targets
    try:
        done = loftq_model_dir(args.model_dir, args.out, bits=args.bits, r=args.rank, iters=args.iters,
                               lora_alpha=args.alpha, target_modules=targets, svd=args.svd,
                               quantizer=args.quantizer)
    except StreamError as exc:  # LoftQInputError included
        print(f"dist-adapters loftq: error: {exc}", file=sys.stderr)
        return 2
    out, adapter = os.path.abspath(done["model_dir"]), os.path.abspath(done["adapter_dir"])
    w = done["weight"] or 1.0
    print(f"model: {out}   adapter: {adapter}   ({done['modules']} weights, {args.bits}-bit, r={args.rank})")
    print(f"relative error ||W - Q||/||W||: quantized alone {done['quant_error'] / w:.5f}, "
          f"with the LoftQ adapter {done['loftq_error'] / w:.5f}")
    quant = (", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')"
             if args.bits == 4 else "")
    print(f"load it with peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({out!r}{quant}), "
          f"{adapter!r}, is_trainable=True)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .launch_cmd import run, spec_from_recipe
    from .launcher import under_launcher
    from .recipe.config import launch_world_size, load_recipe
    from .recipe.train import peft_snippet, preflight, train

    cfg = load_recipe(args.config, args.overrides)
    launch = cfg["launch"]
    if not under_launcher():
        preflight(cfg, launch_world_size(launch))  # fail here, once, before any rank starts
        if (launch["nproc_per_node"] > 1 or launch["nnodes"] > 1 or launch["launcher"] != "torchrun"
                or launch["max_restarts"] or launch["master_addr"]):
            sets = [a for s in args.overrides for a in ("--set", s)]
            code = run(spec_from_recipe(launch), ["-m", "dist_adapters.cli", "train", args.config, *sets])
            if code == 0 and launch["node_rank"] == 0:
                _print_done(cfg, peft_snippet)
            return code
    summary = train(cfg)
    if not under_launcher():
        _print_done(cfg, peft_snippet)
    return 0 if summary else 1


def _print_done(cfg: dict, peft_snippet) -> None:
    out = cfg["train"]["output_dir"]
    print(f"adapter: {out}/adapter   metrics: {out}/metrics.jsonl   loss curve: {out}/loss.png")
    print("load it with peft:\n" + peft_snippet(cfg))


def main(argv: list[str] | None = None) -> int:
    from .launcher import LaunchError
    from .recipe.config import RecipeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        from .launch_cmd import cmd_launch

        return {"train": cmd_train, "loftq": cmd_loftq, "launch": cmd_launch}[args.command](args)
    except (RecipeError, LaunchError) as exc:
        print(f"dist-adapters {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dist-adapters {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
