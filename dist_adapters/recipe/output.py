"""The run directory ``train.output_dir``: what may be written into it, and what a failed run leaves.

Nothing a user has is replaced unless asked (issue 17, rule 4):

    empty or new directory                    a new run
    holds a run (adapter/, checkpoints/, ...)  refused, unless train.overwrite: true (the earlier
                                              run's files are removed first) or the run continues
                                              it (train.resume_from, or a torchrun restart)

A run that fails before its first step leaves no directory it created behind (``discard_unstarted``).
"""

from __future__ import annotations

import os
import shutil

from .checkpoint import is_restart
from .config import RecipeError

# What a run writes into its output directory (README, "The run directory").
RUN_ENTRIES = ("adapter", "checkpoints", "metrics.jsonl", "samples.jsonl", "loss.png", "recipe.json", "base_model", "loftq_init",
               "pissa_init", "olora_init")


def earlier_run(out: str) -> list[str]:
    """The entries of an earlier run in ``out`` (none: a new run may start there)."""
    return [name for name in RUN_ENTRIES if os.path.lexists(os.path.join(out, name))]


def check_output_dir(cfg: dict) -> None:
    """Refuse an output directory that cannot be written, or that holds a run this one would
    replace without being asked. Creates nothing."""
    tr = cfg["train"]
    out = tr["output_dir"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise RecipeError(f"train.output_dir {out!r} is a file, not a directory")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise RecipeError(f"train.output_dir {out!r} is not writable ({parent!r} is "
                          f"{'not a directory' if not os.path.isdir(parent) else 'read-only'})")
    if tr["overwrite"] and tr["resume_from"] is not None:
        raise RecipeError("train.overwrite: true and train.resume_from contradict each other: overwrite starts "
                          "afresh, resume_from continues")
    held = earlier_run(out)
    if held and not tr["overwrite"] and tr["resume_from"] is None and not is_restart():
        raise RecipeError(f"train.output_dir {out!r} already holds a run ({', '.join(held)}): set "
                          "train.overwrite: true to replace it, train.resume_from: auto to continue it, or "
                          "choose another train.output_dir")


def clear_earlier_run(cfg: dict) -> None:
    """train.overwrite: remove the earlier run's entries (only those: other files stay). Never on a
    restart, whose earlier attempt is the run being continued."""
    out = cfg["train"]["output_dir"]
    if not cfg["train"]["overwrite"] or is_restart():
        return
    for name in earlier_run(out):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def started(out: str) -> bool:
    """Whether a run in ``out`` finished at least one step (a metrics row)."""
    try:
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
            return any(line.strip() for line in fh)
    except OSError:
        return False


def discard_unstarted(out: str, existed: bool) -> None:
    """After a failure: remove ``out`` if this run created it and no step finished."""
    if not existed and os.path.isdir(out) and not started(out):
        shutil.rmtree(out, ignore_errors=True)
