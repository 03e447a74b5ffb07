"""Launch command lines and rank discovery.

This module builds the command line of an existing process manager (torchrun's elastic agent,
the deepspeed launcher, OpenMPI's mpirun, Slurm's srun) and discovers, inside a process, the rank
it was given; it never spawns or supervises ranks itself. Commands are argument lists, run
without a shell: a host name or argument is never interpreted by one.

    spec = LaunchSpec(launcher="torchrun", nnodes=2, node_rank=0, master_addr="10.0.0.1", nproc_per_node=8)
    command(spec, ["-m", "dist_adapters.cli", "train", "configs/fsdp2.yaml"])    # -> argv list
    info = init_distributed()          # inside the script: whichever launcher started it
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "srun")
# Put in front of the target under deepspeed, mpirun and srun: it gives the ranks torchrun's
# environment, so a script written for torchrun runs unchanged (dist_adapters/bootstrap.py).
BOOTSTRAP = "dist_adapters.bootstrap"
DEFAULT_PORT = 29500


class LaunchError(ValueError):
    """Bad launch options or hostfile (the CLI prints it as one line, exit 2)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class LaunchSpec:
    launcher: str = "torchrun"
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    hostfile: Optional[str] = None
    nproc_per_node: int = 1
    max_restarts: int = 0
    local_addr: Optional[str] = None
    rdzv_id: str = "dist_adapters"


# ----------------------------------------------------------------------------- hostfiles

_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$|^\[?[0-9A-Fa-f:.]+\]?$")


def check_host(host: str, where: str) -> str:
    """A host name or IP address; anything a shell would read specially is refused."""
    if not _HOST.match(host):
        raise LaunchError(f"{where}: {host!r} is not a valid host name or address "
                          "(letters, digits, '.', '-', '_' only)")
    return host


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """``host slots=N`` lines (deepspeed and OpenMPI share the format); ``#`` starts a comment.
    Errors name the file and line: unknown fields, slots <= 0, duplicate hosts, bad names."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise LaunchError(f"hostfile {path!r}: {exc.strerror or exc}") from None
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        host, *fields = line.split()
        check_host(host, where)
        slots = 1
        for field in fields:
            key, sep, value = field.partition("=")
            if key not in ("slots", "max_slots", "max-slots") or not sep:
                raise LaunchError(f"{where}: unknown field {field!r} (expected 'HOST slots=N')")
            if key == "slots":
                if not re.fullmatch(r"\d+", value) or int(value) <= 0:
                    raise LaunchError(f"{where}: slots must be an integer > 0, got {value!r}")
                slots = int(value)
        if host in (h for h, _ in hosts):
            raise LaunchError(f"{where}: host {host!r} is listed twice")
        hosts.append((host, slots))
    if not hosts:
        raise LaunchError(f"hostfile {path!r} lists no host")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


# ----------------------------------------------------------------------------- command lines

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split_target(argv: list[str]) -> tuple[bool, list[str]]:
    """(is_module, [script_or_module, *args]) of ``SCRIPT ARGS`` / ``-m MODULE ARGS``."""
    if not argv:
        raise LaunchError("nothing to launch: give SCRIPT [ARGS...] or -m MODULE [ARGS...] after --")
    if argv[0] == "-m":
        if len(argv) < 2:
            raise LaunchError("-m needs a module name")
        return True, argv[1:]
    return False, argv


def validate(spec: LaunchSpec) -> None:
    if spec.launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {spec.launcher!r}")
    for name in ("nnodes", "nproc_per_node"):
        if getattr(spec, name) < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if not 0 <= spec.node_rank < spec.nnodes:
        raise LaunchError(f"--node-rank must be in [0, {spec.nnodes}), got {spec.node_rank}")
    if spec.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {spec.max_restarts}")
    if spec.max_restarts and spec.launcher != "torchrun":
        raise LaunchError(f"--max-restarts needs --launcher torchrun (its elastic agent restarts the ranks); "
                          f"{spec.launcher} has no restarts")
    _check_applies(spec)
    if spec.master_addr is not None:
        check_host(spec.master_addr, "--master-addr")
    if spec.local_addr is not None:
        check_host(spec.local_addr, "--local-addr")
    if spec.master_port is not None and not 0 < spec.master_port < 65536:
        raise LaunchError(f"--master-port must be in 1..65535, got {spec.master_port}")
    if spec.nnodes > 1 and spec.launcher == "torchrun" and spec.master_addr is None:
        raise LaunchError("--nnodes > 1 with torchrun needs --master-addr (the address of node 0)")


# Options that only some launchers read: given to another, they would be ignored without a word.
_ONLY_FOR = {
    "hostfile": (("deepspeed", "mpirun"), "torchrun starts one node per command (--nnodes, --node-rank, "
                                          "--master-addr); srun takes its nodes from the allocation"),
    "local_addr": (("torchrun",), "only torchrun's rendezvous reads it"),
    "node_rank": (("torchrun",), "the other launchers start every node from one command"),
}


def _check_applies(spec: LaunchSpec) -> None:
    for name, (launchers, why) in _ONLY_FOR.items():
        value = getattr(spec, name)
        if value not in (None, 0) and spec.launcher not in launchers:
            flag = "--" + name.replace("_", "-")
            raise LaunchError(f"{flag} does not apply to --launcher {spec.launcher} ({why}); it applies to "
                              f"--launcher {' / '.join(launchers)}")


def command(spec: LaunchSpec, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The process manager's argv for ``argv`` (``SCRIPT ARGS`` or ``-m MODULE ARGS``), and the
    environment variables to add. One call gives this node's command (torchrun: one per node)."""
    validate(spec)
    is_module, target = _split_target(argv)
    build = {"torchrun": _torchrun, "deepspeed": _deepspeed, "mpirun": _mpirun, "srun": _srun}[spec.launcher]
    return build(spec, is_module, target)


def _torchrun(spec, is_module, target):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node}",
           f"--max-restarts={spec.max_restarts}", "--monitor-interval=0.5"]
    if spec.nnodes == 1 and spec.master_addr is None:
        cmd.append("--standalone")  # c10d rendezvous on a free local port
    else:
        port = spec.master_port or DEFAULT_PORT
        # c10d rendezvous (node 0's agent hosts the store); node ranks follow --node-rank
        cmd += [f"--nnodes={spec.nnodes}", f"--node-rank={spec.node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={spec.master_addr}:{port}", f"--rdzv-id={spec.rdzv_id}",
                f"--rdzv-conf=is_host={'true' if spec.node_rank == 0 else 'false'}"]
        # the address the other nodes reach this one at (the workers' MASTER_ADDR when this node
        # holds rank 0); torchrun's default, the host name, may resolve to a loopback address
        local = spec.local_addr or (spec.master_addr if spec.node_rank == 0 else None)
        if local:
            cmd.append(f"--local-addr={local}")
    return cmd + (["-m"] if is_module else []) + target, {}


def _deepspeed(spec, is_module, target):
    exe = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [exe, "--no_local_rank", f"--master_port={spec.master_port or free_port()}"]
    if spec.hostfile:
        hosts = read_hostfile(spec.hostfile)
        cmd += [f"--hostfile={spec.hostfile}", f"--num_nodes={len(hosts)}"]
        if spec.master_addr:
            cmd.append(f"--master_addr={spec.master_addr}")
    # on CPU the launcher would start one process per NUMA node without it (docs/field-notes.md)
    cmd.append(f"--num_gpus={spec.nproc_per_node}")
    import torch  # here, not at the top: building command lines must not cost a torch import

    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
    return cmd + ["--module", BOOTSTRAP] + _target(is_module, target), env


def _mpirun(spec, is_module, target):
    exe = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    cmd = [exe]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if spec.hostfile:
        hosts = read_hostfile(spec.hostfile)
        nproc = sum(slots for _, slots in hosts)
        addr = spec.master_addr or hosts[0][0]
        cmd += ["--hostfile", spec.hostfile]
    else:
        nproc, addr = spec.nnodes * spec.nproc_per_node, spec.master_addr or "127.0.0.1"
    port = spec.master_port or free_port()
    # every rank rendezvouses over TCP at MASTER_ADDR:PORT (init_distributed reads OMPI_COMM_WORLD_*)
    cmd += ["--bind-to", "none", "-np", str(nproc), "-x", f"MASTER_ADDR={addr}", "-x", f"MASTER_PORT={port}",
            sys.executable, "-m", BOOTSTRAP]
    return cmd + _target(is_module, target), {}


def _srun(spec, is_module, target):
    cmd = ["srun", f"--nodes={spec.nnodes}", f"--ntasks-per-node={spec.nproc_per_node}", "--kill-on-bad-exit=1",
           sys.executable, "-m", BOOTSTRAP]
    env = {}
    if spec.master_addr:
        env["MASTER_ADDR"] = spec.master_addr
    if spec.master_port:
        env["MASTER_PORT"] = str(spec.master_port)
    return cmd + _target(is_module, target), env


def _target(is_module: bool, target: list[str]) -> list[str]:
    return (["-m"] if is_module else []) + target


# ----------------------------------------------------------------------------- rank discovery

def launcher_env(env=None) -> Optional[dict[str, str]]:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) that whichever launcher started this process implies: the variables to add, or
    None when no launcher did. Reads ``env`` (default ``os.environ``), changes nothing: torchrun
    sets them all, deepspeed all but LOCAL_WORLD_SIZE (its LOCAL_SIZE); OpenMPI
    (OMPI_COMM_WORLD_*), MPICH / Intel MPI (PMI_*, MPI_LOCALNRANKS), Slurm (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE, the first host of SLURM_JOB_NODELIST)
    name them their own way."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        local_size = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
        return {"LOCAL_WORLD_SIZE": local_size} if local_size and "LOCAL_WORLD_SIZE" not in env else {}
    found, extra = None, {}
    if "OMPI_COMM_WORLD_RANK" in env:
        found = (env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"], env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                 env.get("OMPI_COMM_WORLD_LOCAL_SIZE"))
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        found = (env["PMI_RANK"], env["PMI_SIZE"], env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", "0")),
                 env.get("MPI_LOCALNRANKS", env.get("PMI_LOCAL_SIZE")))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:  # a task of srun
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "")))
        found = (env["SLURM_PROCID"], env["SLURM_NTASKS"], env.get("SLURM_LOCALID", "0"),
                 per_node.group(0) if per_node else None)
        if "MASTER_ADDR" not in env:
            nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
            extra["MASTER_ADDR"] = nodes[0]
        # a port derived from the job id: the same on every task, different between jobs
        extra["MASTER_PORT"] = env.get("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if found is None:
        return None
    implied = {"RANK": found[0], "WORLD_SIZE": found[1], "LOCAL_RANK": found[2], **extra}
    if found[3]:
        implied["LOCAL_WORLD_SIZE"] = found[3]
    implied.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    implied.setdefault("MASTER_PORT", env.get("MASTER_PORT", str(DEFAULT_PORT)))
    return implied


def is_launched() -> bool:
    """True when a launcher started this process as one rank of a job (reads the environment only)."""
    return launcher_env() is not None


def discover() -> bool:
    """Write into ``os.environ`` the rank variables ``launcher_env`` finds (what
    ``torch.distributed``'s env:// rendezvous reads). Returns True when this process is one rank
    of a launched job."""
    implied = launcher_env()
    if implied is None:
        return False
    os.environ.update(implied)
    return True


def init_distributed(timeout_minutes: float = 30, need_group: bool = False) -> DistInfo:
    """Join the process group the launcher prepared (gloo on CPU, nccl on CUDA), or run alone.
    ``need_group``: without a launcher, still make a one-process group (engines such as FSDP and
    torch.distributed.checkpoint need one even at world size 1).

    The timeout bounds every collective: a rank that died makes the others fail within it
    instead of hanging forever.
    """
    import torch
    import torch.distributed

    dist = torch.distributed
    launched = discover()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launched and not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        # torchrun keeps one store across restarts (its agent's): without a per-attempt prefix a
        # restarted rank can read the previous attempt's peer addresses and connect to a dead
        # process (gloo: "connectFullMesh failed ... Connection refused", or a hang)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        store.set_timeout(timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"dist_adapters/attempt_{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    elif need_group and not dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it even for a single process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)
