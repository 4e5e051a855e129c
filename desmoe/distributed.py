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
import socket
import sys
import warnings
from pathlib import Path
from datetime import timedelta
from typing import Callable, Optional, TypeVar

from desmoe.errors import LaunchError, UserError
from desmoe.launch_env import (PORT_BASE, PORT_SPAN, SLURM_VARS, TORCH_VARS, DistEnv, _free_port,  # noqa: F401
                                _local_world_size, _per_node_counts, expand_hostlist, export_env, resolve_env)

T = TypeVar("T")

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
