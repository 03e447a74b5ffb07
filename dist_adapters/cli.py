"""`dist-adapters` entry point.

    dist-adapters train CONFIG.yaml [--set key=value ...]

Errors in the user's input (config, data, paths) print one line and exit 2, without a traceback.
Sub-commands `launch`, `consolidate` and `inspect` come with their issues.
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
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .launcher import torchrun_command, under_launcher
    from .recipe.config import load_recipe
    from .recipe.train import peft_snippet, preflight, train

    cfg = load_recipe(args.config, args.overrides)
    nproc = cfg["launch"]["nproc_per_node"]
    if not under_launcher():
        preflight(cfg, nproc * cfg["launch"]["nnodes"])  # fail here, once, before any rank starts
        if nproc > 1:
            sets = [a for s in args.overrides for a in ("--set", s)]
            cmd = torchrun_command(nproc, ["dist_adapters.cli", "train", args.config, *sets])
            code = subprocess.call(cmd)
            if code == 0:
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
    from .recipe.config import RecipeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return cmd_train(args)
    except RecipeError as exc:
        print(f"dist-adapters {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dist-adapters {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
