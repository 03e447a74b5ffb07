"""Issue 22: a checkpoint written under one strategy and world size resumes under another, through
the engine-neutral layout every strategy writes (``checkpoints/step_N/dcp``: adapter and
optimizer state by parameter name; parallel/engine.py). Each pair trains the demo's LoRA +
trainable tokens for 2 steps under the first strategy, resumes under the second to step 4, and
is compared with the uninterrupted none@1 run: step-3 loss and gradient norm
(relative 1e-6), the adapter within 1e-4, and ``verify`` of the result (tests/equivalence.py).
Measured 2.3e-6 to 1.25e-5 (tp@2 -> ddp@2). A resume that drops the optimizer state fails the
adapter: shown once by skipping the neutral load (ddp@2 -> fsdp1@1: 3.0e-3)."""

from __future__ import annotations

import pytest

from equivalence import assert_equivalent
from recipe_helpers import DEMO, cli, small

RESUME_TOL = 1e-4  # issue 22; measured in the closing note
# lr 1e-3, not the suite's 1e-2: Adam turns ~1e-7 rounding differences of a tensor-parallel
# all-reduce into parameter differences proportional to lr (tp@2 alone vs none@1 at 1e-2:
# 8.5e-5, tests/test_tp.py), which would measure tensor parallel, not the resume
LR = 1e-3
PAIRS = [(("fsdp2", 2), ("zero3", 1)), (("zero2", 2), ("fsdp2", 2)), (("tp", 2), ("ddp", 2)),
         (("ddp", 2), ("fsdp1", 1))]


def _train(out, strategy: str, nproc: int, **over) -> None:
    extra = {"parallel.tp_size": nproc} if strategy == "tp" else {}
    res = cli("train", DEMO, "--set", *small(out, **{"train.micro_batch_size": 2, "parallel.strategy": strategy,
                                                     "launch.nproc_per_node": nproc, "train.lr": LR, **extra, **over}))
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _train(out, "none", 1)
    return out


@pytest.mark.parametrize("first,then", PAIRS, ids=[f"{a}@{m}-to-{b}@{n}" for (a, m), (b, n) in PAIRS])
def test_checkpoint_resumes_under_another_engine(uninterrupted, tmp_path, first, then):
    _train(tmp_path / "first", *first, **{"train.steps": 2})
    ckpt = tmp_path / "first" / "checkpoints" / "step_2"
    assert (ckpt / "dcp" / ".metadata").is_file()
    _train(tmp_path / "then", *then, **{"train.resume_from": str(ckpt)})
    assert_equivalent(tmp_path / "then", uninterrupted, RESUME_TOL, f"{first[0]}@{first[1]} -> {then[0]}@{then[1]}")
