"""User-facing errors: one line naming the file, key or value, never a stack dump.

Anything a user can cause (a bad config value, a missing file, an incomplete
launcher environment) raises :class:`UserError`.  Entry points wrap their
``main`` in :func:`run_cli`, which prints ``desmoe: error: <message>`` and exits
with status 2.  A run that cannot go on (:class:`TrainingFailure`, e.g. a NaN
loss) prints ``desmoe: failed: <message>`` and exits 1.  Programming errors keep
their traceback.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input; the message is the whole report."""


class ConfigError(UserError):
    """A config file, key or value is wrong."""


class LaunchError(UserError):
    """The process environment cannot start a distributed job."""


class TrainingFailure(Exception):
    """The run cannot continue (e.g. a non-finite loss); reported in one line, exit 1."""


def run_cli(main: Callable[[], T]) -> Callable[[], T]:
    """Decorate a CLI entry point so user mistakes end in one line on stderr."""

    @functools.wraps(main)
    def wrapper() -> T:
        entry = main.__module__ == "__main__"  # the process's own entry point, not a function a test calls
        try:
            result = _reported(main)
        except SystemExit as done:
            if entry:
                _leave_distributed(done.code)
            raise
        if entry:
            _leave_distributed(0)
        return result

    return wrapper


def _reported(main: Callable[[], T]) -> T:
    try:
        return main()
    except UserError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"desmoe: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingFailure as err:
        print(f"desmoe: failed: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's job: a line each, not a traceback
        print("desmoe: interrupted (Ctrl-C); the work since the last checkpoint is lost, a new launch resumes "
              "from it", file=sys.stderr, flush=True)
        raise SystemExit(130) from None  # 128 + SIGINT, what a shell reports for a job ended by Ctrl-C


def _leave_distributed(code) -> None:
    """A rank of a distributed job ends here, its work done and written: Python's exit handlers run (the process
    group is destroyed, logs and TensorBoard flushed), stdio is flushed, and the process exits without the C++
    teardown that follows them.  That teardown intermittently aborted a finished rank ("terminate called without
    an active exception", no Python frame: docs/reliability.md), and the launcher or Slurm then marked a
    finished job failed.  A process that never started torch.distributed exits as Python does."""
    import os

    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    import atexit
    import ctypes
    import threading

    status = code if isinstance(code, int) else (0 if code is None else 1)
    if not isinstance(code, (int, type(None))):
        print(code, file=sys.stderr)  # what SystemExit("text") prints before exiting 1
    getattr(threading, "_shutdown", lambda: None)()  # what interpreter exit does first: join non-daemon threads
    atexit._run_exitfuncs()  # noqa: SLF001 - then the exit handlers; os._exit skips both
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    ctypes.CDLL(None).fflush(None)  # C libraries' buffered output (their stdout is a file under Slurm)
    os._exit(status)
