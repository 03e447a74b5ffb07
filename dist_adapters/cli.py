"""`dist-adapters` entry point.

    dist-adapters train CONFIG.yaml [--set key=value ...]
    dist-adapters launch [--launcher L --nnodes N --node-rank R --master-addr A ...] -- SCRIPT ARGS
    dist-adapters loftq MODEL_DIR OUT [--bits 4 --rank 16 --iters 5 --alpha A ...]
    dist-adapters consolidate SRC OUT [--tag T --config C --dtype bf16 --split qkv_proj=q_proj:N,...]
    dist-adapters inspect PATH [--tag T --json]

Errors in the user's input (config, data, paths, hostfiles) print one line and exit 2, without a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (it prints the usage first, which wraps over many)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    add_checkpoint_parsers(sub)
    verify = sub.add_parser("verify", help="check that a saved adapter reproduces the model that trained it",
                            description="Check every tensor against the sha256 recorded at save time "
                                        "(verification.json), then load the base and the adapter in this "
                                        "process, rerun the recorded probe batch and compare the logits with the "
                                        "live model's. Exit 0 if all match, 1 naming what differs.")
    verify.add_argument("path", metavar="PATH", help="a run directory, a checkpoints/step_N or a PEFT adapter "
                                                     "directory saved by dist-adapters")
    verify.add_argument("--base", default=None, metavar="BASE_DIR",
                        help="the base model directory (default: the adapter's base_model_name_or_path)")
    verify.add_argument("--atol", type=float, default=None,
                        help="logits tolerance, times max(1, their RMS) (default by the base dtype: fp32 1e-4, "
                             "bf16 5e-2, fp16 1e-2)")
    _add_target(verify)
    return parser


def add_checkpoint_parsers(sub) -> None:
    cons = sub.add_parser("consolidate", help="a sharded checkpoint (ZeRO-1/2/3, DCP, accelerate FSDP, Megatron TP, "
                                              "PEFT) to a PEFT adapter directory",
                          description="Read only the adapter's tensors of SRC (one at a time, files memory-mapped) "
                                      "and write a PEFT directory OUT (adapter_model.safetensors + "
                                      "adapter_config.json) that peft, transformers and vLLM load. SRC is only read.")
    cons.add_argument("src", metavar="SRC", help="checkpoint directory or file")
    cons.add_argument("out", metavar="OUT", help="output PEFT directory")
    inspect = sub.add_parser("inspect", help="what a checkpoint or adapter directory holds",
                             description="Print the format, world size, ZeRO stage and tag, the adapter's keys "
                                         "(peft names) with shapes and dtypes, and its adapter_config.json.")
    inspect.add_argument("src", metavar="PATH", help="checkpoint directory or file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--base", default=None, metavar="BASE_DIR",
                         help="a torchtitan checkpoint: the Hugging Face base model (its config.json has the head "
                              "counts that split the fused q/k/v)")
    for p in (cons, inspect):
        p.add_argument("--tag", default=None, help="DeepSpeed tag to read (default: the 'latest' file)")
        p.add_argument("--adapter-name", default=None, help="adapter to take when the checkpoint holds several "
                                                            "(default: 'default' or the only one)")
        p.add_argument("--strip-prefix", default="", metavar="PREFIX",
                       help="outer prefix of every key, e.g. 'model.' for a DCP saved as {'model': state_dict} "
                            "(accelerate's pytorch_model_fsdp_N/ is recognised by itself)")
    cons.add_argument("--config", default=None, help="adapter_config.json (or its directory) to write; default: "
                                                     "found next to SRC or its run directory, else inferred from "
                                                     "the shapes with --lora-alpha or --guess-alpha")
    cons.add_argument("--lora-alpha", type=_number, default=None, metavar="A",
                      help="lora_alpha of a checkpoint without adapter_config.json (the scaling alpha/r is in no "
                           "tensor; r, rank_pattern and target_modules come from the shapes)")
    cons.add_argument("--guess-alpha", action="store_true",
                      help="without a config or --lora-alpha, write lora_alpha = r (scaling 1), knowing the "
                           "adapter may then differ from the trained model")
    cons.add_argument("--overwrite", action="store_true", help="replace the adapter in an existing, non-empty OUT")
    cons.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                      help="output dtype (default: as stored; ZeRO's fp32 masters stay fp32)")
    cons.add_argument("--split", action="append", default=[], metavar="FUSED=NAME:ROWS,...",
                      help="split a fused projection's LoRA into per-projection keys, e.g. "
                           "qkv_proj=q_proj:4096,k_proj:1024,v_proj:1024 (repeatable)")
    cons.add_argument("--quiet", action="store_true", help="no progress bar")
    cons.add_argument("--verify", action="store_true",
                      help="then load OUT onto the base in this process: against the live model's record when "
                           "SRC is ours, else check it loads, gives finite logits and changes them; writes "
                           "OUT/verification.json (see dist-adapters verify)")
    cons.add_argument("--base", default=None, metavar="BASE_DIR",
                      help="the Hugging Face base model: with --verify, the model to load OUT onto (default: "
                           "base_model_name_or_path of the config); a torchtitan checkpoint needs its config.json "
                           "for the head count of the q/k rotary row order")
    _add_target(cons)


def _add_target(parser) -> None:
    parser.add_argument("--target", choices=["vllm"], default=None,
                        help="check what that serving engine accepts (rank, modules_to_save, embedding LoRA, "
                             "trainable tokens, DoRA, bias) and say what to change; rules with their sources in "
                             "dist_adapters/checkpoint/data/")
    parser.add_argument("--max-lora-rank", type=int, default=None, metavar="N",
                        help="with --target vllm: the --max-lora-rank vLLM will be started with (default 16)")


def _number(text: str):
    """An int or float in any spelling Python accepts (16, 1e1, 32.0); ints stay ints."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _parse_split(items: list[str]) -> dict:
    spec = {}
    for item in items:
        fused, _, parts = item.partition("=")
        try:
            spec[fused.strip()] = [(n.strip(), int(size)) for n, size in (p.split(":") for p in parts.split(","))]
        except ValueError:
            raise ValueError(f"--split {item!r}: expected FUSED=NAME:ROWS,NAME:ROWS,... "
                             "(e.g. qkv_proj=q_proj:4096,k_proj:1024,v_proj:1024)") from None
        if not fused.strip() or not spec[fused.strip()]:
            raise ValueError(f"--split {item!r}: expected FUSED=NAME:ROWS,...")
    return spec


def cmd_consolidate(args: argparse.Namespace) -> int:
    from .checkpoint.consolidate import consolidate

    warn = lambda msg: print(f"dist-adapters consolidate: warning: {msg}", file=sys.stderr)  # noqa: E731
    done = consolidate(args.src, args.out, tag=args.tag, config=args.config, dtype=args.dtype,
                       adapter_name=args.adapter_name, strip_prefix=args.strip_prefix,
                       split=_parse_split(args.split), quiet=args.quiet, warn=warn, lora_alpha=args.lora_alpha,
                       guess_alpha=args.guess_alpha, overwrite=args.overwrite, target=args.target,
                       max_lora_rank=args.max_lora_rank, base=args.base)
    where = f", tag {done['tag']}" if done.get("tag") else ""
    print(f"{done['format']} ({done['world_size']} ranks{where}) -> {os.path.abspath(done['out'])}: "
          f"{done['tensors']} tensors, {done['bytes'] / 2**20:.2f} MiB, adapter {done['adapter_name']!r}, "
          f"config: {done['config']}")
    if done["other_adapters"]:
        print(f"also in the checkpoint (not written): adapters {done['other_adapters']}")
    if args.verify:
        from .verify_cmd import VerifyFailure, verify_converted

        try:
            print(f"verify: OK: {verify_converted(args.out, args.src, args.base, done['format'])}")
        except VerifyFailure as exc:
            print(f"dist-adapters consolidate: verify FAILED: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .checkpoint.consolidate import inspect

    info = inspect(args.src, tag=args.tag, adapter_name=args.adapter_name, strip_prefix=args.strip_prefix,
                   base=args.base)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key in ("format", "path", "world_size", "stage", "tag", "tp_size", "deepspeed_version", "files",
                "tensors_total", "adapter_name", "other_adapters", "adapter_parameters", "config_file"):
        if info.get(key) not in (None, []):
            print(f"{key:18} {info[key]}")
    if info.get("adapter") is None:
        print(f"adapter            none: {info['note']}")
        return 0
    width = max(len(k) for k in info["adapter"])
    print(f"adapter tensors    {len(info['adapter'])}")
    for key, meta in info["adapter"].items():
        print(f"  {key:{width}}  {str(tuple(meta['shape'])):14} {meta['dtype']}")
    if info.get("config"):
        print("config\n" + json.dumps(info["config"], indent=2))
    else:
        print("config             none found (consolidate infers r and targets from the shapes; "
              "lora_alpha needs --lora-alpha, --config or --guess-alpha)")
    return 0


def cmd_loftq(args: argparse.Namespace) -> int:
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
    from .launcher import is_launched
    from .recipe.config import launch_world_size, load_recipe
    from .recipe.preflight import preflight
    from .recipe.train import peft_snippet, train

    cfg = load_recipe(args.config, args.overrides)
    launch = cfg["launch"]
    if not is_launched():
        preflight(cfg, launch_world_size(launch))  # fail here, once, before any rank starts
        if (launch["nproc_per_node"] > 1 or launch["nnodes"] > 1 or launch["launcher"] != "torchrun"
                or launch["max_restarts"] or launch["master_addr"]):
            from .recipe.output import discard_unstarted

            existed = os.path.isdir(cfg["train"]["output_dir"])
            sets = [a for s in args.overrides for a in ("--set", s)]
            code = run(spec_from_recipe(launch), ["-m", "dist_adapters.cli", "train", args.config, *sets])
            if code == 0 and launch["node_rank"] == 0:
                _print_done(cfg, peft_snippet)
            elif code != 0:  # ranks killed before they could clean up
                discard_unstarted(cfg["train"]["output_dir"], existed)
            return code
    summary = train(cfg)
    if not is_launched():
        _print_done(cfg, peft_snippet)
    return 0 if summary else 1


def _leave_at_once() -> None:
    """A launched rank whose job is done (every file written, its process groups destroyed)
    exits without interpreter finalization: finalizing objects that still reference an engine's
    communication threads (DeepSpeed's, a device mesh's groups) can abort a finished rank
    ("terminate called without an active exception", exit -6; seen about once in a hundred
    launches, docs/field-notes.md), which would fail the whole job. Only as ``python -m
    dist_adapters.cli``: a caller of ``main()`` keeps its process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _print_done(cfg: dict, peft_snippet) -> None:
    out = cfg["train"]["output_dir"]
    print(f"adapter: {out}/adapter   metrics: {out}/metrics.jsonl   loss curve: {out}/loss.png")
    print("load it with peft:\n" + peft_snippet(cfg))


def _reporting_rank() -> bool:
    """One rank of a launched job reports a user error (every rank finds the same one)."""
    from .launcher import launcher_env

    implied = launcher_env()
    if implied is None:
        return True
    return implied.get("RANK", os.environ.get("RANK", "0")) == "0"


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 (all match), 1 (something differs: named), 2 (unreadable input: named)."""
    from .checkpoint.allow_list import CheckpointError
    from .verify_cmd import VerifyFailure, verify

    try:
        print(f"dist-adapters verify: OK: {verify(args.path, args.base, args.atol, args.target, args.max_lora_rank)}")
        return 0
    except VerifyFailure as exc:
        print(f"dist-adapters verify: FAILED: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"dist-adapters verify: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from .checkpoint.allow_list import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "verify":
        return cmd_verify(args)
    if args.command in ("consolidate", "inspect"):  # offline tools: no launcher / torch import
        user_errors: tuple = (CheckpointError, FileNotFoundError, ValueError)
    else:
        from .launcher import LaunchError
        from .recipe.config import RecipeError

        user_errors = (RecipeError, LaunchError, CheckpointError)
    try:
        if args.command == "launch":
            from .launch_cmd import cmd_launch

            return cmd_launch(args)
        commands = {"train": cmd_train, "loftq": cmd_loftq, "consolidate": cmd_consolidate, "inspect": cmd_inspect}
        return commands[args.command](args)
    except user_errors as exc:
        if _reporting_rank():
            print(f"dist-adapters {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print(f"dist-adapters {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    exit_code = main()
    from .launcher import is_launched

    if exit_code == 0 and is_launched():
        _leave_at_once()
    sys.exit(exit_code)
