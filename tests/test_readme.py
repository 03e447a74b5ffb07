"""Every copy-paste command of the README is exercised (issue 17): run here as written (a train
run shortened by appending ``--set train.steps=2 train.output_dir=TMP``, which override the
command's own values), run with ``--dry-run`` where it needs hosts this machine does not have,
or named with the test that runs it (its paths are placeholders such as ``path/to/model``).
A README command in none of the three tables fails ``test_every_readme_command_is_exercised``.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys

import pytest

from recipe_helpers import ROOT

SHELL = ("make", "dist-adapters", "torchrun", "python", ".venv/bin/python", "sbatch")

# Run as written, with SHORTEN appended to train commands.
RUN = [
    "dist-adapters train configs/demo.yaml --set train.steps=60 train.lr=5e-3 train.output_dir=runs/long",
    "torchrun --standalone --nproc_per_node 2 -m dist_adapters.cli train configs/demo.yaml",
    "dist-adapters train configs/demo.yaml --set 'model.quantization={bits: 4, quant_type: nf4}' "
    "parallel.strategy=none launch.nproc_per_node=1",
    ".venv/bin/python benchmarks/lora_linear.py",
    "dist-adapters train configs/moe.yaml --set parallel.strategy=fsdp2",
    "dist-adapters train configs/moe.yaml --set parallel.strategy=ep parallel.ep_size=2",
]
# Launch commands for other machines: `launch --dry-run` must accept them and build the command.
DRY_RUN = [
    "dist-adapters launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 --nproc-per-node 8 "
    "-- -m dist_adapters.cli train configs/fsdp2.yaml",
    "dist-adapters launch --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --local-addr 10.0.0.2 --master-port 29500 "
    "--nproc-per-node 8 -- -m dist_adapters.cli train configs/fsdp2.yaml",
    "dist-adapters launch --launcher deepspeed --hostfile launch/hostfile.example -- -m dist_adapters.cli train "
    "configs/zero3.yaml",
    "dist-adapters launch --launcher mpirun --nproc-per-node 2 -- -m dist_adapters.cli train configs/demo.yaml",
    "dist-adapters launch --max-restarts 1 --nproc-per-node 2 -- -m dist_adapters.cli train configs/demo.yaml",
]
# Commands whose paths are placeholders, or that other tests run as they are: command -> test.
TESTED_BY = {
    "make demo": "tests/test_recipe.py::test_demo_config_two_ranks_learns_the_task_and_peft_reproduces",
    "make test": "tests/test_readme.py::test_make_test_is_what_ci_runs",
    "make benchmark": "tests/test_benchmarks.py::test_make_benchmark_writes_results_table_and_chart",
    "dist-adapters train configs/fsdp2.yaml --set parallel.compile=true":
        "tests/test_compile.py::test_recipe_compile_trains_as_eager",
    "python examples/trl_sft.py --out runs/trl_sft": "tests/test_examples.py::test_trl_sft_example_checkpoints_hold_a_peft_adapter",
    "torchrun --standalone --nproc_per_node 2 examples/trl_sft.py --out runs/trl_sft":
        "tests/test_examples.py::test_trl_sft_example_checkpoints_hold_a_peft_adapter",
    'make test PYTEST_ARGS="-k interop -x"': "tests/test_readme.py::test_make_test_is_what_ci_runs",
    "dist-adapters train configs/demo.yaml": "tests/test_recipe.py::test_demo_config_two_ranks_learns_the_task_and_peft_reproduces",
    "dist-adapters train configs/moe.yaml": "tests/test_moe.py::test_moe_recipe_under_each_engine_equals_single_process",
    "dist-adapters train configs/moe.yaml --set parallel.strategy=fsdp2_ep parallel.ep_size=2 launch.nproc_per_node=4":
        "tests/test_moe.py::test_moe_recipe_under_each_engine_equals_single_process",
    "dist-adapters train configs/moe.yaml --set parallel.strategy=hf_ep parallel.ep_size=2":
        "tests/test_moe.py::test_moe_recipe_under_each_engine_equals_single_process",
    "dist-adapters train configs/demo.yaml --set launch.launcher=mpirun launch.nproc_per_node=2 parallel.strategy=ddp":
        "tests/test_launcher.py::test_other_launchers_give_the_same_adapter",
    "sbatch launch/slurm.sbatch configs/fsdp2.yaml": "tests/test_launcher.py::test_launch_scripts_parse_and_example_hostfile_is_valid",
    "dist-adapters inspect output/checkpoint-500": "tests/test_consolidate.py::test_inspect_lists_format_stage_tag_keys_and_config",
    "dist-adapters consolidate output/checkpoint-500 out/adapter":
        "tests/test_consolidate.py::test_zero_checkpoint_equals_zero_to_fp32_and_loads_in_peft",
    "dist-adapters consolidate ds_ckpt out/adapter --tag global_step300 --dtype bf16":
        "tests/test_consolidate.py::test_tag_option_and_source_untouched",
    "dist-adapters consolidate accelerate_state/ out/adapter":
        "tests/test_consolidate.py::test_dcp_checkpoint_equals_dcp_to_torch_save_and_loads_in_peft",
    "dist-adapters consolidate dcp_dir out/adapter --config run/adapter_config.json":
        "tests/test_consolidate.py::test_dcp_checkpoint_equals_dcp_to_torch_save_and_loads_in_peft",
    "dist-adapters consolidate megatron_shards/ out/adapter":
        "tests/test_megatron.py::test_consolidate_tp2_shards_equals_the_single_process_adapter",
    "dist-adapters consolidate outputs/checkpoint/step-1000 out/adapter --base llama3_hf --lora-alpha 16":
        "tests/test_foreign_sources.py::test_torchtitan_checkpoint_consolidates_to_the_live_adapter",
    "dist-adapters consolidate bridge_run/checkpoints out/adapter":
        "tests/test_foreign_sources.py::test_megatron_bridge_checkpoint_consolidates_to_the_live_adapter",
    "dist-adapters consolidate ckpt out/adapter --split qkv_proj=q_proj:4096,k_proj:1024,v_proj:1024":
        "tests/test_consolidate.py::test_split_fused_projection",
    "python -m torch.distributed.run --standalone --nproc_per_node 2 examples/deepspeed_consolidate.py --out runs/ds":
        "tests/test_examples.py::test_deepspeed_checkpoint_consolidated_after_the_run",
    "dist-adapters verify runs/demo": "tests/test_verify.py::test_verify_a_run_a_checkpoint_and_an_adapter_with_its_base",
    "dist-adapters verify runs/demo/checkpoints/step_10":
        "tests/test_verify.py::test_verify_a_run_a_checkpoint_and_an_adapter_with_its_base",
    "dist-adapters verify out/adapter --base path/to/model":
        "tests/test_verify.py::test_verify_a_run_a_checkpoint_and_an_adapter_with_its_base",
    "dist-adapters verify runs/demo --target vllm": "tests/test_serving.py::test_the_cli_refuses_and_names_the_fix",
    "dist-adapters consolidate output/checkpoint-500 out/adapter --target vllm --max-lora-rank 64":
        "tests/test_serving.py::test_the_cli_refuses_and_names_the_fix",
    "dist-adapters loftq path/to/model out/loftq --bits 4 --rank 16 --iters 5":
        "tests/test_loftq.py::test_cli_loftq_end_to_end_loads_in_peft",
    "dist-adapters train configs/qlora.yaml": "tests/test_loftq.py::test_recipe_loftq_qlora_starts_closer_and_loads_in_peft",
    "python -m torch.distributed.run --standalone --nproc_per_node 2 examples/megatron_lora.py --out runs/megatron_lora":
        "tests/test_megatron.py::test_megatron_example_trains_and_saves",
}


def readme_commands() -> list[str]:
    """Shell lines of the README's code blocks, without their trailing ``# comment``."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            line = re.sub(r"\s+", " ", re.split(r"\s{2,}#", line)[0].strip())
            if line.split(" ", 1)[0] in SHELL:
                commands.append(line)
    return commands


def _environment(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    bin_dir = os.path.dirname(sys.executable)  # dist-adapters, torchrun: the test venv's
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) >= 25, commands  # the parser still finds the README's commands
    missing = [c for c in commands if c not in RUN and c not in DRY_RUN and c not in TESTED_BY]
    assert not missing, f"README commands no test exercises: {missing}"
    stale = [c for c in [*RUN, *DRY_RUN, *TESTED_BY] if c not in commands]
    assert not stale, f"commands no longer in the README: {stale}"


@pytest.mark.parametrize("command", sorted(set(TESTED_BY.values())))
def test_named_tests_exist(command):
    path, name = command.split("::")
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, command


@pytest.mark.parametrize("command", RUN)
def test_readme_command_runs(command, tmp_path):
    argv = shlex.split(command)
    if "train" in argv:
        argv += ["--set", "train.steps=2", f"train.output_dir={tmp_path / 'run'}"]
    if argv[0] == ".venv/bin/python":  # the README's venv; here, the test's interpreter
        argv = [sys.executable, *argv[1:], "--dim", "512", "--rounds", "1", "--iters", "1"]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_environment(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    if "train" in argv:
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    else:
        assert "ours/peft" in res.stdout or "ratio" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("command", DRY_RUN)
def test_readme_launch_command_builds(command, tmp_path):
    argv = shlex.split(command)
    argv.insert(argv.index("launch") + 1, "--dry-run")
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_environment(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dist_adapters.cli train configs/" in res.stdout, res.stdout


def test_make_test_is_what_ci_runs():
    """`make test` is this suite: CI's .ci/run calls it, and PYTEST_ARGS reaches pytest."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        assert "make test" in fh.read()
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as fh:
        makefile = fh.read()
    assert re.search(r"^test: .*\n\t.*pytest.*\$\(PYTEST_ARGS\)", makefile, flags=re.M), makefile
    assert re.search(r"^demo: .*\n\t\$\(VENV\)/bin/dist-adapters train configs/demo\.yaml", makefile, flags=re.M)
