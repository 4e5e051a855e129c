"""The one place where processes find each other.

Supported launchers, in order of precedence:

* torchrun / the ``deepspeed`` launcher: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT are already set;
* Slurm ``srun`` with one task per device: SLURM_PROCID, SLURM_NTASKS,
  SLURM_LOCALID and SLURM_JOB_NODELIST are mapped onto them; the master is the
  first host of the step's node list (SLURM_STEP_NODELIST, else the job's) and the port
  is derived from SLURM_JOB_ID and SLURM_STEP_ID so jobs
  sharing a node do not collide (MASTER_ADDR / MASTER_PORT still win if set);
* Open MPI ``mpirun``: OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK, with MASTER_PORT (and MASTER_ADDR unless
  every rank is on one node) passed by ``mpirun -x``;
* nothing at all: a single process on this machine.

A partial environment (say RANK without WORLD_SIZE) is an error, never a guess.
Backends: with CUDA the process groups map devices to backends
(``cpu:gloo,cuda:nccl``), so a collective on a CPU tensor (statistics, flags)
runs on gloo and one on a GPU tensor on NCCL -- the same code works on CPU-only
tests and GPU jobs (reductions: ``desmoe.collectives``).  Without CUDA: gloo with
DeepSpeed's CPU accelerator.  Every collective has a timeout so a dead peer fails
the job.
"""
from __future__ import annotations

import atexit
import os
import re
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Callable, Mapping, MutableMapping, Optional, TypeVar

from desmoe.errors import LaunchError, UserError

T = TypeVar("T")

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


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def extensions_dir(prefix: str) -> str:
    """Where this environment's JIT-built ops go, keyed by the path the environment is reached through.

    DeepSpeed JIT-builds a shared-memory comm op for the CPU accelerator and caches it by op name only: a
    per-venv folder stops two environments evicting each other.  The build command names the op's sources
    through that path, so one venv reached through two spellings (a symlink, an NFS export mounted at
    another path on another node) saw a changed command in each process and rebuilt the op every launch,
    each waiting minutes for the others' builds (measured: a 15 s launch took 120-160 s beside three
    clones sharing a venv by symlink).  One folder per spelling builds once per spelling."""
    import hashlib

    return os.path.join(prefix, "torch_extensions", hashlib.sha256(prefix.encode()).hexdigest()[:12])


def prepare_process() -> None:
    """Process-level defaults that must be in place before DeepSpeed is imported."""
    # DeepSpeed's ZeRO calls a torch API that warns on every step; it is not ours to fix.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated")
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir(sys.prefix))
    # On CPU, one intra-op thread per rank beats oversubscription by 3-5x (measured).
    if not use_cuda() and "OMP_NUM_THREADS" not in os.environ:
        world = _local_world_size()
        threads = max(1, (os.cpu_count() or 1) // max(world, 1))
        import torch

        torch.set_num_threads(threads)


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


def init_distributed(timeout_s: float = 600.0, env: Optional[DistEnv] = None) -> DistEnv:
    """Initialise torch.distributed + DeepSpeed comm; idempotent."""
    prepare_process()
    import deepspeed
    import deepspeed.comm as dist
    import torch

    _check_accelerator()

    d = env or resolve_env()
    export_env(d)
    if dist.is_initialized():
        return d
    _check_master_addr(d)
    backend = dist_backend()
    if use_cuda():
        torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    _load_shm_op()
    # DeepSpeed hands the string to torch.distributed.init_process_group; its expert-parallel groups
    # (dist.new_group without a backend) inherit the default group's device->backend map.
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))
    except torch.distributed.DistNetworkError as err:
        if "EADDRINUSE" not in str(err) and "address already in use" not in str(err):
            raise
        raise LaunchError(f"MASTER_PORT={d.master_port}: in use on {socket.gethostname()}, rank {d.rank} cannot "
                          f"listen on it; set MASTER_PORT to a free port") from None
    _unlink_shm_segment(d)
    # A process that exits with its process group alive can abort in teardown ("terminate called
    # without an active exception", seen on a 4-rank Slurm job after all ranks had finished), and
    # the scheduler then marks a finished job FAILED.
    atexit.register(_destroy_process_group)
    return d


def _check_accelerator() -> None:
    """DS_ACCELERATOR=cuda where torch sees no CUDA device (a job that got no GPU) silently ran on CPU and
    gloo, a hundred times slower, as if the user had asked for it."""
    import torch

    if os.environ.get("DS_ACCELERATOR") == "cuda" and not torch.cuda.is_available():
        raise LaunchError(f"DS_ACCELERATOR=cuda but torch sees no CUDA device (CUDA_VISIBLE_DEVICES="
                          f"'{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}'): give the job GPUs, "
                          f"or set DS_ACCELERATOR=cpu")


def _check_master_addr(d: DistEnv) -> None:
    """torch's store retries a name it cannot resolve until the timeout (600 s) and then prints a traceback:
    a typo, or an IPv6 address in URL brackets ('[::1]'), left every rank waiting ten minutes."""
    try:
        socket.getaddrinfo(d.master_addr, d.master_port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise LaunchError(f"MASTER_ADDR='{d.master_addr}': rank {d.rank} on {socket.gethostname()} cannot resolve it; "
                          f"expected a host name or an IP address (IPv6 without brackets)") from None


SHM_SEGMENT = "deepspeed_allreduce_buffer"  # DeepSpeed's name prefix (ops/csrc/cpu/comm/shm.cpp)


def _unlink_shm_segment(d: DistEnv) -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory segment once every rank has mapped it.

    DeepSpeed's CPU comm op gives each rank of a one-node job a 66 MiB ``/dev/shm`` segment named after
    the master address and port; every rank maps every peer's segment inside ``init_distributed`` and
    nothing ever unlinks the names, so each run left 66 MiB of RAM per rank behind in ``/dev/shm``
    (killed runs too: 17 GiB had piled up on a CI box after a day of tests, and it swapped).  The
    segments are only opened by name during init: after a barrier every mapping exists, and unlinking
    keeps them while the kernel frees the memory when the job's last process exits, however it exits."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's own condition (shm_interface.cpp): the CPU op, and every rank on this node
    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(d.world_size):
        return
    dist.barrier()
    name = f"{SHM_SEGMENT}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    Path("/dev/shm", f"{name}_{d.rank}").unlink(missing_ok=True)


def _load_shm_op() -> None:
    """Load DeepSpeed's shared-memory comm op before ``deepspeed.init_distributed`` does (DeepSpeed then
    reuses this process's module) with :func:`without_stale_baton` around torch's JIT load."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        without_stale_baton(_get_build_directory(builder.name, verbose=False), build_shm_op)


def without_stale_baton(build_dir: str | os.PathLike, load: Callable[[], T]) -> T:
    """``load()`` (a torch JIT extension load) under an exclusive ``flock`` on ``build_dir``, after removing
    a stale ``build_dir/lock``.

    torch guards every JIT load, even one that only finds the build up to date, with a lock *file*
    (``FileBaton``) and waits for it to vanish, without limit.  A process killed inside the load (torchrun
    or srun ending the peers of a rank that failed at start-up, a job cancelled, a test timing out) leaves
    it behind, and from then on every launch that uses the environment hangs silently in
    ``init_distributed`` (measured on the shared 2-core box: every engineer's runs and tests, for good).  A
    ``flock`` dies with its holder; every desmoe process loads under it, so whoever holds it knows that no
    desmoe process is inside a load, and a lock file still there is one a dead process left."""
    import fcntl
    from pathlib import Path

    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "desmoe.flock", "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # a live load by another process (a build takes minutes) is waited for
        except OSError:  # a filesystem without locks: torch's own lock file is all there is
            return load()
        stale = build_dir / "lock"
        if stale.exists():
            warnings.warn(f"{stale}: left by a process killed while loading a JIT extension; removed")
            stale.unlink(missing_ok=True)
        return load()


def dist_backend() -> str:
    """The backend string of the default process group: NCCL serves CUDA tensors, gloo CPU ones."""
    return "cpu:gloo,cuda:nccl" if use_cuda() else "gloo"


def _destroy_process_group() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001  (exiting anyway; nothing useful to report)
            pass


def device() -> "torch.device":  # noqa: F821
    import torch

    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_rank0() -> bool:
    import deepspeed.comm as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def prepare_in_turn(fn: Callable[[], T]) -> T:
    """Run ``fn`` (which may build or download into shared caches) on global rank 0 first, then on each
    node's local rank 0, then on the rest, with a barrier between turns.

    Whether the cache sits on a shared or a node-local disk, one process fills a folder and the others
    find it complete.  A failure on any rank ends every rank: a UserError stays one line.
    """
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return fn()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    turn = 0 if rank == 0 else 1 if int(os.environ.get("LOCAL_RANK", rank)) == 0 else 2
    result, error = None, None
    for phase in range(3):
        if phase == turn:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others heard of it
                error = err
        reports: list = [None] * world
        tdist.all_gather_object(reports, None if error is None else (isinstance(error, UserError), str(error)))
        if error is not None:
            raise error
        failed = next(((r, rep) for r, rep in enumerate(reports) if rep is not None), None)
        if failed is not None:
            r, (user, msg) = failed
            raise (UserError if user else RuntimeError)(f"{msg} (on rank {r})")
    return result
