"""One job per run directory.

Two launches into the same run directory (a second ``sbatch`` of the same script, a
``make demo`` beside a manual run) would interleave checkpoints, ``latest`` and metrics
rows.  Rank 0 therefore holds an exclusive ``flock`` on ``<run>/.lock`` for the whole
run; a second job's rank 0 fails to take it and every rank of that job stops in one
line before it reads or writes anything of the run.

Why ``flock`` and not "the file exists": the kernel drops the lock when its process
dies, however it dies (SIGKILL, OOM killer, a node reboot for NFS), so a killed or
requeued job never leaves a stale lock behind; the file itself stays and only says who
held it last.  On NFS the Linux client maps ``flock`` to a POSIX lock the server
enforces across nodes; a filesystem without locks (Lustre mounted without ``flock``)
makes the run go on unprotected, with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Optional

from desmoe.errors import UserError

LOCK = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    who = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return json.dumps({**who, **({"slurm_job": job} if job else {})}) + "\n"


class RunLock:
    """``acquire`` on every rank (collective); ``release`` on every rank when the run ends."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir, self.fd = Path(run_dir), None

    def _take(self) -> Optional[str]:
        """Rank 0: take the lock; the one-line reason why not, or None."""
        path = self.run_dir / LOCK
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            return f"{self.run_dir}: cannot write the run directory ({err.strerror}); give a writable run.dir"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (f"{self.run_dir}: in use by another job ({path}: {held}); wait for it to end, or use "
                    f"another run.name")
        except OSError as err:
            if err.errno not in _UNSUPPORTED:  # returned, not raised: rank 0 alone would leave its peers waiting
                os.close(fd)
                return f"{self.run_dir}: cannot lock {path} ({err.strerror})"
            warnings.warn(f"{path}: this filesystem has no file locks ({err.strerror}); nothing stops a second "
                          f"job from writing into this run directory at the same time")
        try:  # a full disk or quota fails here first: one line on every rank, not a traceback on rank 0 only
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder().encode(), 0)
        except OSError as err:
            os.close(fd)
            return (f"{self.run_dir}: cannot write the run directory ({path}: {err.strerror}); free space or give "
                    f"a writable run.dir")
        self.fd = fd
        return None

    def acquire(self) -> "RunLock":
        from desmoe.collectives import all_gather_object
        from desmoe.distributed import is_rank0

        why = self._take() if is_rank0() else None
        why = all_gather_object(why)[0]  # every rank stops, with rank 0's reason, before touching the run
        if why is not None:
            raise UserError(why)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
