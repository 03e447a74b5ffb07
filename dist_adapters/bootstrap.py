"""Run a script written for torchrun under any launcher:

    python -m dist_adapters.bootstrap SCRIPT [ARGS...]
    python -m dist_adapters.bootstrap -m MODULE [ARGS...]

``dist-adapters launch`` puts it in front of the target under deepspeed, mpirun and srun. It adds
the torchrun environment that the launcher implies (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; ``launcher.launcher_env``) and then runs the target
as ``__main__``, the way ``python SCRIPT`` would: a plain ``dist.init_process_group("gloo")``
then works without importing this library. Imports no torch itself.
"""

from __future__ import annotations

import os
import runpy
import sys

from .launcher import launcher_env

USAGE = "usage: python -m dist_adapters.bootstrap SCRIPT [ARGS...] | -m MODULE [ARGS...]"


def main(argv: list[str]) -> None:
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        print(f"dist_adapters.bootstrap: error: nothing to run; {USAGE}", file=sys.stderr)
        sys.exit(2)
    os.environ.update(launcher_env() or {})
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    if not os.path.isfile(script):
        print(f"dist_adapters.bootstrap: error: script {script!r} does not exist", file=sys.stderr)
        sys.exit(2)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` does
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
