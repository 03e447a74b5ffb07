"""Issue 9: `dist-adapters launch`, rank discovery, hostfiles, failures and restarts.

Every multi-process test starts real process managers (torchrun's elastic agent, the deepspeed
launcher, OpenMPI's mpirun) and compares the trained adapter with a single node of 2 ranks."""

import os
import re
import subprocess
import sys
import time

import pytest

from dist_adapters.launcher import LaunchError, LaunchSpec, command, discover, expand_nodelist, free_port, read_hostfile
from recipe_helpers import DEMO, ROOT, cli, cli_forked, max_adapter_diff, small

DDP = {"parallel.strategy": "ddp", "train.steps": 6}
# Every launcher, node layout and restart runs the same ops in the same order: measured 0.0 each
LAUNCH_TOL = 1e-6


def recipe_sets(out, **over) -> list[str]:
    return small(out, **{**DDP, **over})


def launch(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_adapters.cli", "launch", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def train_args(out, **over) -> list[str]:
    return ["-m", "dist_adapters.cli", "train", DEMO, "--set", *recipe_sets(out, **over)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One node, 2 ranks, torchrun --standalone (the recipe launching itself)."""
    out = tmp_path_factory.mktemp("launch") / "reference"
    res = cli("train", DEMO, "--set", *recipe_sets(out, **{"launch.nproc_per_node": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- command lines

def test_dry_run_prints_each_launchers_command(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two hosts\nnode-a slots=2\nnode-b slots=2  # comment\n")
    res = launch("--dry-run", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port",
                 "29400", "--nproc-per-node", "4", "--max-restarts", "3", "--", "train.py", "--lr", "1")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    for part in ("-m torch.distributed.run", "--nproc-per-node=4", "--max-restarts=3", "--nnodes=2", "--node-rank=1",
                 "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-conf=is_host=false",
                 "train.py --lr 1"):
        assert part in line, (part, line)
    assert "--standalone" in launch("--dry-run", "--", "x.py").stdout
    mpi = launch("--dry-run", "--launcher", "mpirun", "--hostfile", str(hostfile), "--", "-m", "pkg.mod").stdout
    assert f"--hostfile {hostfile}" in mpi and "--bind-to none -np 4" in mpi and "MASTER_ADDR=node-a" in mpi
    assert ("--allow-run-as-root" in mpi) == (os.geteuid() == 0) and mpi.strip().endswith("-m pkg.mod")
    ds = launch("--dry-run", "--launcher", "deepspeed", "--hostfile", str(hostfile), "--", "-m", "pkg.mod").stdout
    assert "--num_nodes=2" in ds and "--num_gpus=1" in ds and "--no_local_rank" in ds
    assert "--module dist_adapters.bootstrap -m pkg.mod" in ds  # torchrun's environment for the ranks
    srun = launch("--dry-run", "--launcher", "srun", "--nnodes", "2", "--nproc-per-node", "8", "--", "t.py").stdout
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 ")
    assert not list(tmp_path.glob("*.log"))  # nothing ran


HOSTFILE_ERRORS = [
    ("node-a slots=0\n", r"hosts:1: slots must be an integer > 0, got '0'"),
    ("node-a slots=-2\n", r"hosts:1: slots must be an integer > 0, got '-2'"),
    ("\nnode-a slots=two\n", r"hosts:2: slots must be an integer > 0, got 'two'"),
    ("node-a;rm -rf / slots=2\n", r"hosts:1: 'node-a;rm' is not a valid host name"),
    ("$(touch pwned) slots=1\n", r"hosts:1: '\$\(touch' is not a valid host name"),
    ("node-a gpus=2\n", r"hosts:1: unknown field 'gpus=2'"),
    ("node-a slots=1\nnode-a slots=1\n", r"hosts:2: host 'node-a' is listed twice"),
    ("# only a comment\n", r"lists no host"),
]


@pytest.mark.parametrize("text,message", HOSTFILE_ERRORS)
def test_hostfile_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "hosts").write_text(text)
    with pytest.raises(LaunchError, match=message):
        read_hostfile(str(tmp_path / "hosts"))


def test_hostfile_errors_from_the_cli_are_one_line(tmp_path):
    argvs = {}
    for i, (text, _) in enumerate(HOSTFILE_ERRORS):
        (tmp_path / f"hosts{i}").write_text(text)
        argvs[str(i)] = ["launch", "--dry-run", "--launcher", "mpirun", "--hostfile", str(tmp_path / f"hosts{i}"),
                         "--", "x.py"]
    for i, res in cli_forked(argvs).items():
        message = HOSTFILE_ERRORS[int(i)][1].replace("hosts:", f"hosts{i}:")
        assert res.returncode == 2 and res.stderr.startswith("dist-adapters launch: error: ") and not res.stdout
        assert re.search(message, res.stderr) and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "pwned").exists() and not os.path.exists(os.path.join(ROOT, "pwned"))


def test_launch_option_errors():
    cases = [
        (["--nnodes", "2", "--", "x.py"], "--nnodes > 1 with torchrun needs --master-addr"),
        (["--launcher", "mpirun", "--max-restarts", "1", "--", "x.py"], "--max-restarts needs --launcher torchrun"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--", "x.py"], "--node-rank must be in [0, 2)"),
        (["--master-addr", "a b", "--", "x.py"], "'a b' is not a valid host name"),
        ([], "nothing to launch"),
        # issue 17, rule 7: an option the chosen launcher would ignore is an error naming both
        (["--hostfile", "launch/hostfile.example", "--", "x.py"],
         "--hostfile does not apply to --launcher torchrun"),
        (["--hostfile", "no-such-or-malformed-hostfile", "--", "x.py"],
         "--hostfile does not apply to --launcher torchrun"),
        (["--launcher", "srun", "--hostfile", "launch/hostfile.example", "--", "x.py"],
         "--hostfile does not apply to --launcher srun"),
        (["--launcher", "mpirun", "--local-addr", "10.0.0.2", "--", "x.py"],
         "--local-addr does not apply to --launcher mpirun"),
        (["--launcher", "srun", "--nnodes", "2", "--node-rank", "1", "--", "x.py"],
         "--node-rank does not apply to --launcher srun"),
    ]
    results = cli_forked({" ".join(args): ["launch", "--dry-run", *args] for args, _ in cases})
    for args, message in cases:
        res = results[" ".join(args)]
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr


def test_recipe_launch_errors_name_the_key():
    from test_recipe import _one_line_error

    cases = {"launch.node_rank must be in [0, 2)": ["launch.nnodes=2", "launch.node_rank=3", "launch.master_addr=h"],
             "launch.max_restarts needs launch.launcher torchrun": ["launch.launcher=deepspeed",
                                                                     "launch.max_restarts=1"],
             "launch.hostfile does not apply to launch.launcher torchrun": ["launch.hostfile=launch/hostfile.example"]}
    results = cli_forked({message: ["train", DEMO, "--set", *sets] for message, sets in cases.items()})
    for message, res in results.items():
        _one_line_error(res, message)


def test_rank_discovery_from_each_launcher(monkeypatch):
    cases = [
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
          "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}, ("3", "4", "1", "n0", "1234")),
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, ("1", "2", "1", "127.0.0.1", "29500")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
          "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "42"}, ("5", "8", "1", "gpu07", str(15000 + 42))),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "9"},
         ("1", "2", "1", "a", "9")),  # torchrun / deepspeed: already set
    ]
    for given, (rank, world, local, addr, port) in cases:
        env = dict(given)
        monkeypatch.setattr(os, "environ", env)
        assert discover()
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
            (rank, world, local, addr, port), given
    monkeypatch.setattr(os, "environ", {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # an allocation, not an srun task
    assert not discover()
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]


def test_is_launched_only_reads_the_environment(monkeypatch):
    from dist_adapters.launcher import is_launched

    given = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}
    env = dict(given)
    monkeypatch.setattr(os, "environ", env)
    assert is_launched() and env == given  # discover() is the one that writes RANK etc.
    monkeypatch.setattr(os, "environ", {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert not is_launched()


def test_command_is_an_argv_list_not_a_shell_string():
    cmd, _ = command(LaunchSpec(nproc_per_node=2), ["train.py", "--name", "a b; echo x"])
    assert cmd[-3:] == ["train.py", "--name", "a b; echo x"]


# ----------------------------------------------------------------------------- real launches

def test_two_nodes_on_one_machine_equal_one_node(reference, tmp_path):
    port = str(free_port())
    out = tmp_path / "two_nodes"
    procs = [subprocess.Popen([sys.executable, "-m", "dist_adapters.cli", "launch", "--nnodes", "2", "--node-rank",
                               str(r), "--master-addr", "127.0.0.1", "--master-port", port, "--",
                               *train_args(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    diff = max_adapter_diff(reference, out)
    print(f"2 nodes x 1 rank (c10d on 127.0.0.1) vs 1 node x 2 ranks: {diff:.2e}")
    assert diff <= LAUNCH_TOL


@pytest.mark.parametrize("launcher", ["mpirun", "deepspeed"])
def test_other_launchers_give_the_same_adapter(reference, tmp_path, launcher):
    out = tmp_path / launcher
    res = cli("train", DEMO, "--set", *recipe_sets(out, **{"launch.nproc_per_node": 2, "launch.launcher": launcher}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dist-adapters launch: " in res.stdout and (launcher in res.stdout)
    diff = max_adapter_diff(reference, out)
    print(f"{launcher} 2 ranks vs torchrun 2 ranks: {diff:.2e}")
    assert diff <= LAUNCH_TOL


def fault_run(tmp_path, mode, step, *launch_args):
    out, marker = tmp_path / mode, tmp_path / "killed_at"
    cmd = [sys.executable, "-m", "dist_adapters.cli", "launch", "--nproc-per-node", "2", *launch_args, "--",
           os.path.join(ROOT, "tests", "dist", "recipe_fault.py"), mode, str(step), str(marker), DEMO,
           "--set", *recipe_sets(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    ended = time.time()
    return res, out, float(marker.read_text()) if marker.exists() else None, ended


def test_killed_rank_ends_the_job_quickly(tmp_path):
    res, out, killed, ended = fault_run(tmp_path, "kill_rank1", 3)
    assert killed is not None, res.stderr[-3000:]
    print(f"launch exited {ended - killed:.1f} s after the SIGKILL, code {res.returncode}")
    assert res.returncode != 0 and ended - killed < 30
    assert not (out / "adapter").exists()


def test_killed_rank_with_restart_resumes_to_the_same_adapter(reference, tmp_path):
    res, out, killed, _ = fault_run(tmp_path, "kill_rank1", 3, "--max-restarts", "1")
    assert res.returncode == 0 and killed is not None, res.stderr[-3000:]
    assert "resuming from" in res.stdout and "step_2 (step 2)" in res.stdout
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 6  # the interrupted attempt's rows past the checkpoint were dropped
    diff = max_adapter_diff(reference, out)
    print(f"SIGKILL at step 3 + restart vs uninterrupted: {diff:.2e}")
    assert diff <= LAUNCH_TOL


def test_killed_during_checkpoint_write_resumes_from_the_previous_one(reference, tmp_path):
    res, out, killed, _ = fault_run(tmp_path, "kill_in_checkpoint", 4, "--max-restarts", "1")
    assert res.returncode == 0 and killed is not None, res.stderr[-3000:]
    assert "step_2 (step 2)" in res.stdout  # not the half-written step_4
    assert sorted(os.listdir(out / "checkpoints")) == ["step_2", "step_4", "step_6"]  # the partial was redone
    diff = max_adapter_diff(reference, out)
    print(f"SIGKILL inside checkpoint step_4 + restart vs uninterrupted: {diff:.2e}")
    assert diff <= LAUNCH_TOL


def test_two_nodes_in_two_network_namespaces(reference, tmp_path):
    """Two hosts with their own addresses (network namespaces over a veth pair), made inside an
    unprivileged user namespace (tests/dist/two_netns.py): no root needed, the host's network
    untouched. Needs util-linux's unshare and iproute2's ip."""
    out = tmp_path / "netns"
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "--net", sys.executable,
           os.path.join(ROOT, "tests", "dist", "two_netns.py"), str(free_port()), "--", *train_args(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    diff = max_adapter_diff(reference, out)
    print(f"2 nodes in 2 network namespaces over a veth pair vs 1 node: {diff:.2e}")
    assert diff <= LAUNCH_TOL


def test_launch_scripts_parse_and_example_hostfile_is_valid():
    folder = os.path.join(ROOT, "launch")
    scripts = sorted(f for f in os.listdir(folder) if f.endswith((".sh", ".sbatch")))
    assert scripts == ["deepspeed_hostfile.sh", "mpirun.sh", "slurm.sbatch", "torchrun_multinode.sh"]
    for name in scripts:
        text = open(os.path.join(folder, name)).read()
        assert subprocess.run(["bash", "-n", os.path.join(folder, name)]).returncode == 0, name
        assert "dist-adapters launch --launcher" in text, name
    assert read_hostfile(os.path.join(folder, "hostfile.example")) == [("node-0", 8), ("node-1", 8)]


# ----------------------------------------------------------------------------- plain torch scripts

def _plain_results(out, world: int = 2) -> list[dict]:
    import json

    got = []
    for rank in range(world):
        with open(f"{out}.rank{rank}.json", encoding="utf-8") as fh:
            got.append(json.load(fh))
    return got


def _assert_torchrun_environment(got: list[dict], args: list[str]) -> None:
    """Every rank saw all six torchrun variables, joined one gloo group by env:// and ran as __main__."""
    for rank, seen in enumerate(got):
        env = seen["env"]
        assert all(env[k] for k in env), env
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == \
            (str(rank), "2", str(rank), "2"), env
        assert (seen["rank"], seen["world"], seen["sum"], seen["main"]) == (rank, 2, 3.0, "__main__"), seen
        assert seen["argv"] == args, seen


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun", "deepspeed"])
def test_plain_torch_script_runs_under_every_launcher(tmp_path, launcher):
    """Issue 17, rule 8: a script written for torchrun (dist.init_process_group("gloo"), no
    dist_adapters import) runs unchanged under `dist-adapters launch`: deepspeed, mpirun and srun
    get dist_adapters.bootstrap in front of it, which adds the torchrun environment."""
    out = str(tmp_path / "plain")
    res = launch("--launcher", launcher, "--nproc-per-node", "2", "--", "tests/dist/plain_torch.py", out, "x y")
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_torchrun_environment(_plain_results(out), [out, "x y"])


def test_plain_torch_script_runs_as_srun_tasks(tmp_path):
    """srun is not installed here: two tasks are started with the environment srun gives its
    tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE, the node list),
    through the command srun would run (``launch --dry-run --launcher srun``)."""
    out = str(tmp_path / "plain")
    dry = launch("--dry-run", "--launcher", "srun", "--nproc-per-node", "2", "--", "tests/dist/plain_torch.py", out)
    argv = dry.stdout.split()
    assert argv[:4] == ["srun", "--nodes=1", "--ntasks-per-node=2", "--kill-on-bad-exit=1"], dry.stdout
    assert argv[5:7] == ["-m", "dist_adapters.bootstrap"]
    task = argv[4:]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    slurm = {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "127.0.0.1",
             "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_ID": str(free_port())}
    procs = [subprocess.Popen(task, cwd=ROOT, env={**env, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    _assert_torchrun_environment(_plain_results(out), [out])


def test_bootstrap_errors_are_one_line():
    for args, message in [([], "nothing to run"), (["-m"], "nothing to run"),
                          (["no/such/script.py"], "script 'no/such/script.py' does not exist")]:
        res = subprocess.run([sys.executable, "-m", "dist_adapters.bootstrap", *args], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
