"""How this process learns its rank, the world and the master from the launcher's environment (torchrun and the
``deepspeed`` launcher, Slurm's srun, Open MPI's mpirun, or nothing: one process), and how many ranks share
its machine.  Read by :mod:`desmoe.distributed` (which re-exports these names); nothing here starts a process
group."""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

from desmoe.errors import LaunchError

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torch", "slurm", "mpirun" or "single"


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list such as ``gpu[01-03,07],login1`` or ``rack[1-2]-n[1-2]`` into host names."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):  # commas inside brackets separate ranges, not hosts
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise LaunchError(f"SLURM_JOB_NODELIST='{hostlist}': unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(hostlist[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"SLURM_JOB_NODELIST='{hostlist}': unbalanced brackets")
    parts.append(hostlist[start:])
    hosts = [h for part in parts if part for h in _expand_one(part, hostlist)]
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST='{hostlist}': no host names in it")
    return hosts


def _expand_one(part: str, hostlist: str) -> list[str]:
    """One host expression; every bracket group multiplies (Slurm: ``a[1-2]b[3-4]`` is a1b3 a1b4 a2b3 a2b4)."""
    m = re.fullmatch(r"([^\[\]]*)\[([^\]]*)\](.*)", part)
    if not m:
        return [part]
    prefix, ranges, rest = m.groups()
    tails = _expand_one(rest, hostlist)
    hosts = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or int(hi or lo) < int(lo):
            raise LaunchError(f"SLURM_JOB_NODELIST='{hostlist}': cannot read the range '{item}'")
        for n in range(int(lo), int(hi or lo) + 1):
            hosts.extend(f"{prefix}{str(n).zfill(len(lo))}{tail}" for tail in tails)
    return hosts


def _int(env: Mapping[str, str], key: str) -> int:
    value = env.get(key, "")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {key}='{value}': expected an integer") from None


def resolve_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    env = os.environ if env is None else env
    present = [k for k in TORCH_VARS if k in env]
    if "RANK" in env or "WORLD_SIZE" in env:
        required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [k for k in required if k not in env]
        if missing:
            raise LaunchError(
                f"incomplete launcher environment: {', '.join(present)} set but {', '.join(missing)} missing"
            )
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        return _checked(DistEnv(rank, world, local, env["MASTER_ADDR"], _int(env, "MASTER_PORT"), "torch"))
    if any(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS")):
        missing = [k for k in SLURM_VARS + ("SLURM_JOB_ID",) if k not in env]
        if missing:
            raise LaunchError(f"incomplete Slurm environment: {', '.join(missing)} missing (run the job with srun)")
        job = _int(env, "SLURM_JOB_ID")
        if env.get("ENVIRONMENT") == "BATCH" and "SLURM_STEP_ID" not in env and _int(env, "SLURM_NTASKS") > 1:
            # The batch script itself carries SLURM_PROCID=0 and the job's task count but no step id (srun's
            # tasks have one): one process would wait at the rendezvous for tasks nobody started.
            raise LaunchError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process is job {job}'s batch script, "
                              f"not a task of an srun step: start one process per task with srun "
                              f"(slurm/launch.sh does), or ask for --ntasks=1")
        # the step's nodes, not the job's: `srun -w n2 -n2` inside a 2-node job runs no task on n1
        addr = env.get("MASTER_ADDR") or expand_hostlist(env.get("SLURM_STEP_NODELIST")
                                                         or env["SLURM_JOB_NODELIST"])[0]
        # two steps of one job running at once (a study's srun calls in parallel) must not share a port
        step = _int(env, "SLURM_STEP_ID") if env.get("SLURM_STEP_ID", "").isdigit() else 0
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else PORT_BASE + (job + 7919 * step) % PORT_SPAN
        return _checked(DistEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID"),
                                addr, port, "slurm"))
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _from_mpirun(env)
    if present:
        raise LaunchError(f"incomplete launcher environment: {', '.join(present)} set but RANK and WORLD_SIZE missing")
    return DistEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def _from_mpirun(env: Mapping[str, str]) -> DistEnv:
    """Open MPI's ``mpirun`` (also DeepSpeed's ``--launcher openmpi``): each process knows its rank from
    OMPI_COMM_WORLD_* but nothing says where rank 0 listens.  Without this, every process of
    ``mpirun -np 4`` took itself for a world of one and trained alone."""
    world, local_size = _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_size == world else "")
    missing = [k for k, v in (("MASTER_ADDR", addr), ("MASTER_PORT", env.get("MASTER_PORT"))) if not v]
    if missing and world > 1:
        raise LaunchError(f"OMPI_COMM_WORLD_SIZE={world} (mpirun) but {' and '.join(missing)} unset: expected "
                          f"mpirun -x MASTER_ADDR=<rank 0's host> -x MASTER_PORT=<free port>")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
    return _checked(DistEnv(_int(env, "OMPI_COMM_WORLD_RANK"), world, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
                            addr or "127.0.0.1", port, "mpirun"))


def _checked(d: DistEnv) -> DistEnv:
    if d.world_size < 1 or not 0 <= d.rank < d.world_size:
        raise LaunchError(f"rank {d.rank} is not in a world of size {d.world_size} (from {d.source} variables)")
    if not 0 <= d.local_rank < d.world_size:  # it picks the GPU (modulo the visible count) and who fills caches
        raise LaunchError(f"local rank {d.local_rank} (from {d.source} variables): expected 0..{d.world_size - 1}, "
                          f"below the world size {d.world_size}")
    if not 0 < d.master_port < 65536:
        raise LaunchError(f"MASTER_PORT={d.master_port}: expected a port in 1..65535")
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_env(d: DistEnv, env: MutableMapping[str, str] = os.environ) -> None:
    env.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
               MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))


def _local_world_size() -> int:
    """Ranks sharing this machine: torchrun, deepspeed launcher and Slurm each say it differently."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return max(1, int(value))
    # Slurm: this node's entry of the step's per-node counts ("4,2", "2(x3),1"); SLURM_NTASKS_PER_NODE is
    # only set by --ntasks-per-node, so a job asking --ntasks gave every rank all the node's cores.
    node = os.environ.get("SLURM_NODEID", "")
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        counts = _per_node_counts(os.environ.get(key, ""))
        if counts and len(set(counts)) == 1:  # the same on every node: SLURM_NODEID is not needed
            return max(1, counts[0])
        if counts and node.isdigit() and int(node) < len(counts):
            return max(1, counts[int(node)])
    return 1


def _per_node_counts(value: str) -> list[int]:
    """Slurm's compressed per-node counts: ``2(x3),1`` is [2, 2, 2, 1]; [] when unreadable."""
    counts = []
    for item in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            return []
        counts += [int(m[1])] * int(m[2] or 1)
    return counts
