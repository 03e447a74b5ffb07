import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def single_run(tmp_path_factory):
    """The reference every strategy is compared with: the demo config (LoRA + trainable tokens)
    for 4 steps, strategy none, 1 process, micro batch 2 (4 accumulation steps)."""
    from recipe_helpers import DEMO, cli, small

    out = tmp_path_factory.mktemp("single")
    res = cli("train", DEMO, "--set", *small(out, **{"train.micro_batch_size": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def single_sgd_run(tmp_path_factory):
    """The same run with plain SGD and no clipping (recipe_helpers.SGD), a checkpoint after every
    step: the reference of the SGD equivalence tests, which see a wrong gradient scale in the
    adapter itself."""
    from recipe_helpers import DEMO, SGD, cli, small

    out = tmp_path_factory.mktemp("single_sgd")
    res = cli("train", DEMO, "--set", *small(out, **SGD, **{"train.micro_batch_size": 2, "train.checkpoint_every": 1}))
    assert res.returncode == 0, res.stderr[-3000:]
    return out
