"""`dist-adapters launch` and the recipe's ``launch:`` section: one code path.

    dist-adapters launch [--launcher torchrun|deepspeed|mpirun|srun] [--nnodes N --node-rank R
        --master-addr A --master-port P [--local-addr B] | --hostfile F] [--nproc-per-node K] [--max-restarts M]
        [--dry-run] -- SCRIPT ARGS...        (or -- -m MODULE ARGS...)

The process manager does the spawning and supervision; this only builds its command line (see
launcher.py), runs it without a shell, forwards SIGINT / SIGTERM to it and returns its exit code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess

from .launcher import LAUNCHERS, LaunchSpec, command

SPEC_KEYS = ("launcher", "nnodes", "node_rank", "master_addr", "master_port", "hostfile", "nproc_per_node",
             "max_restarts", "local_addr")


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="run a script under torchrun / deepspeed / mpirun / srun, one or many nodes",
                       description="Build the command line of an existing process manager and run it "
                                   "(no shell). Everything after -- is the script and its arguments.")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (torchrun, one command per node)")
    p.add_argument("--master-addr", default=None, help="address of node 0 (rendezvous host)")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--local-addr", default=None,
                   help="torchrun: this node's address as the other nodes reach it (default: --master-addr on "
                        "node 0, the host name elsewhere)")
    p.add_argument("--hostfile", default=None, help="'HOST slots=N' lines (deepspeed, mpirun)")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun: restart all ranks up to M times after a failure (the recipe resumes "
                        "from its newest complete checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="print the command line and run nothing")
    p.add_argument("target", nargs=argparse.REMAINDER, metavar="-- SCRIPT ARGS")


def spec_from_args(args: argparse.Namespace) -> LaunchSpec:
    return LaunchSpec(**{k: getattr(args, k) for k in SPEC_KEYS})


def spec_from_recipe(launch: dict) -> LaunchSpec:
    return LaunchSpec(**{k: launch[k] for k in SPEC_KEYS if k in launch})


def render(cmd: list[str], env: dict[str, str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(cmd)])


def run(spec: LaunchSpec, argv: list[str], dry_run: bool = False) -> int:
    """Build and run (or print) the command; returns its exit code."""
    cmd, env = command(spec, argv)
    if dry_run:
        print(render(cmd, env))
        return 0
    print(f"dist-adapters launch: {render(cmd, env)}", flush=True)
    child = subprocess.Popen(cmd, env={**os.environ, **env})

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def cmd_launch(args: argparse.Namespace) -> int:
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    return run(spec_from_args(args), target, dry_run=args.dry_run)
