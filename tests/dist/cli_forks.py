"""Run many `dist-adapters` command lines as real processes at the cost of one import.

    python tests/dist/cli_forks.py CASES.json RESULTS.json [--jobs N]

CASES.json: a JSON object {name: [argv after `dist-adapters`]}. The parent imports the CLI and
the heavy modules its commands import (torch, transformers, the recipe) once, runs no torch op,
then forks one child per case (N at a time). Each child points its file descriptors 1 and 2 at
files of its own (so whatever the process writes, by Python or by C, is captured as a
subprocess would see it), runs `dist_adapters.cli.main(argv)` as `python -m dist_adapters.cli`
does, and leaves with its exit code; an exception that escapes main prints its traceback, as
the interpreter would, and exits 1.

RESULTS.json: {name: {"returncode": int, "stdout": str, "stderr": str}}. Used by
tests/test_bad_input.py: 61 cases at ~4.5 s of imports each were most of the suite's slowest
fixture.
"""

import importlib
import json
import os
import shutil
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import dist_adapters.cli as cli  # noqa: E402

for _module in ("dist_adapters.recipe.train", "dist_adapters.checkpoint.consolidate", "transformers"):
    importlib.import_module(_module)  # what the commands would import: once, here, before any fork


def _child(argv: list[str], out_path: str, err_path: str) -> None:
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv = [cli.__file__, *argv]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(cases: dict[str, list[str]], jobs: int) -> dict[str, dict]:
    work = tempfile.mkdtemp(prefix="cli_forks_")
    pending, running, results = list(cases.items()), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, argv = pending.pop(0)
            paths = (os.path.join(work, f"{len(results) + len(running)}.out"),
                     os.path.join(work, f"{len(results) + len(running)}.err"))
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(argv, *paths)
            running[pid] = (name, paths)
        pid, status = os.wait()
        name, (out_path, err_path) = running.pop(pid)
        with open(out_path, encoding="utf-8", errors="replace") as fh_out, \
                open(err_path, encoding="utf-8", errors="replace") as fh_err:
            results[name] = {"returncode": os.waitstatus_to_exitcode(status), "stdout": fh_out.read(),
                             "stderr": fh_err.read()}
    shutil.rmtree(work)
    return results


if __name__ == "__main__":
    cases_path, results_path = sys.argv[1], sys.argv[2]
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 2
    with open(cases_path, encoding="utf-8") as fh:
        found = run(json.load(fh), jobs)
    with open(results_path, "w", encoding="utf-8") as fh:
        json.dump(found, fh)
