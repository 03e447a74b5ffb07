"""The recipe under a launcher, with one fault injected by the test (never by the library).

    recipe_fault.py MODE STEP MARKER CONFIG [--set ...]

Crashes, on the first attempt only (restart count 0); before dying the rank writes the time of
the kill to MARKER, and restarted attempts run cleanly:
- kill_rank1: rank 1 SIGKILLs itself when training step STEP (0-based) begins.
- kill_in_checkpoint: rank 0 SIGKILLs itself while writing checkpoint step_STEP, after the
  adapter and optimizer files and before the completion marker (trainer_state.json).

Wrong arithmetic, on every rank of the job (STEP and MARKER unused), each a bug the equivalence
tests (tests/equivalence.py) must see:
- loss_x2: the gradient of every rank is twice what it should be (a dropped "/ world size").
- no_copies: samples shared by tensor-parallel ranks are counted once per rank (a dropped
  "/ copies"): the token count doubles under tp=2, the gradient halves.
- double_allreduce: the recipe's all-reduce of token counts and losses runs twice.
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


def kill_rank1() -> None:
    lr_at = train._lr_at

    def _lr_at(s, tr):
        if s == step:
            die()
        return lr_at(s, tr)

    train._lr_at = _lr_at


def kill_in_checkpoint() -> None:
    write = checkpoint.atomic_write_text

    def atomic_write_text(path, text):
        if f".step_{step}.partial" in path and path.endswith(checkpoint.STATE_NAME):
            die()
        return write(path, text)

    checkpoint.atomic_write_text = atomic_write_text


if mode == "kill_rank1":
    if first_attempt and rank == 1:
        kill_rank1()
elif mode == "kill_in_checkpoint":
    if first_attempt and rank == 0:
        kill_in_checkpoint()
elif mode == "loss_x2":
    scale = train.gradient_scale
    train.gradient_scale = lambda engine, total: 2 * scale(engine, total)
elif mode == "no_copies":
    train.replica_copies = lambda engine, dist: 1
elif mode == "double_allreduce":
    once = train.all_reduce_sum
    train.all_reduce_sum = lambda value: once(once(value))
elif mode != "none":
    sys.exit(f"recipe_fault.py: unknown mode {mode!r}")

sys.exit(cli.main(["train", *argv]))
