"""The recipe under a launcher, with one fault on the first attempt (restart count 0).

    recipe_fault.py MODE STEP MARKER CONFIG [--set ...]

MODE kill_rank1: rank 1 SIGKILLs itself when training step STEP (0-based) begins.
MODE kill_in_checkpoint: rank 0 SIGKILLs itself while writing checkpoint step_STEP, after the
adapter and optimizer files and before the completion marker (trainer_state.json).
Before dying it writes the time of the kill to MARKER. Restarted attempts run cleanly.
"""

import os
import signal
import sys
import time

from dist_adapters import cli
from dist_adapters.recipe import checkpoint, train

mode, step, marker, *argv = sys.argv[1:]
step = int(step)
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
rank = int(os.environ.get("RANK", "0"))


def die() -> None:
    with open(marker, "w") as fh:
        fh.write(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


if first_attempt and mode == "kill_rank1" and rank == 1:
    lr_at = train._lr_at

    def _lr_at(s, tr):
        if s == step:
            die()
        return lr_at(s, tr)

    train._lr_at = _lr_at
elif first_attempt and mode == "kill_in_checkpoint" and rank == 0:
    write = checkpoint.atomic_write_text

    def atomic_write_text(path, text):
        if f".step_{step}.partial" in path and path.endswith(checkpoint.STATE_NAME):
            die()
        return write(path, text)

    checkpoint.atomic_write_text = atomic_write_text

sys.exit(cli.main(["train", *argv]))
