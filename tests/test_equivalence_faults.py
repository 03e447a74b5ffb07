"""The equivalence tests can fail. Each fault of tests/dist/recipe_fault.py (a gradient twice too
large on every rank, a dropped "/ copies" under tensor parallel, the recipe's all-reduce run
twice) is injected into a one-step SGD run under each strategy, and the very check the
equivalence tests use (tests/equivalence.py) must reject it; the same run without a fault passes.

A dropped "/ copies" changes nothing where every rank holds its own samples (copies is 1), so it
is injected under the tensor-parallel strategies only."""

import pytest

from equivalence import equivalence_report, failing_parts
from recipe_helpers import DEMO, SGD, SGD_TOL, small, torchrun_script

DATA_PARALLEL = ["ddp", "fsdp1", "fsdp2", "zero2", "zero3"]
TENSOR_PARALLEL = ["tp", "fsdp2_tp"]
CASES = ([(s, f) for s in DATA_PARALLEL for f in ("loss_x2", "double_allreduce")]
         + [(s, f) for s in TENSOR_PARALLEL for f in ("loss_x2", "double_allreduce", "no_copies")]
         + [("ddp", "none"), ("tp", "none")])


@pytest.mark.parametrize("strategy, fault", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_equivalence_check_rejects_an_injected_fault(single_sgd_run, tmp_path, strategy, fault):
    over = {**SGD, "parallel.strategy": strategy, "launch.nproc_per_node": 2, "train.steps": 1,
            "train.checkpoint_every": 10}
    if strategy in TENSOR_PARALLEL:
        over["parallel.tp_size"] = 2
    res = torchrun_script("recipe_fault.py", [fault, "0", str(tmp_path / "unused"), DEMO, "--set",
                                              *small(tmp_path / "run", **over)])
    assert res.returncode == 0, res.stderr[-3000:]
    report = equivalence_report(tmp_path / "run", single_sgd_run, SGD_TOL)
    print(f"{strategy} with fault {fault}: " + ", ".join(f"{k} {m:.2e}" for k, (m, _) in report.items()))
    if fault == "none":
        assert failing_parts(report) == [], report
    else:
        # the gradient is 2x or 0.5x: its norm and the SGD step show it; the logged loss does not move
        assert failing_parts(report) == ["grad_norm", "adapter"], report
