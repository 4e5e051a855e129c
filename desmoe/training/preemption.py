"""Save-and-exit on preemption, agreed by every rank at a step boundary.

Slurm asks for a signal before the time limit (``#SBATCH --signal=USR1@120``)
and schedulers send SIGTERM before preempting.  The handler only sets a flag;
the training loop calls :meth:`Preemption.requested` once per step, which
all-reduces the flag so every rank stops at the *same* step (signals reach ranks
at different moments), saves a checkpoint and exits.

How the supervisor learns about it: under our Slurm scripts (which set
``DESMOE_REQUEUE_MARKER``) rank 0 writes that file and every rank exits 0 --
a non-zero exit would make ``srun --kill-on-bad-exit`` kill ranks still
finishing -- and the script requeues the job when the marker exists.  Elsewhere
the ranks exit with ``EXIT_PREEMPTED`` (75).  The requeued job resumes from the
checkpoint.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


MARKER_ENV = "DESMOE_REQUEUE_MARKER"


class Preempted(SystemExit):
    def __init__(self, step: int) -> None:
        super().__init__(0 if os.environ.get(MARKER_ENV) else EXIT_PREEMPTED)
        self.step = step


def announce(step: int, rank0: bool) -> None:
    """Tell the supervisor (see module doc); call on every rank after the save."""
    import deepspeed.comm as dist

    marker = os.environ.get(MARKER_ENV)
    if marker and rank0:
        from desmoe.checkpoint import write_text_atomic

        write_text_atomic(Path(marker).absolute(), f"{step}\n")
    if dist.is_initialized():
        dist.barrier()  # no rank leaves before the marker exists


def exit_for_requeue(monitor, preemption: "Preemption", step: int, where: str) -> None:
    """After the checkpoint of ``step`` is saved: close the monitor, say so, tell the supervisor, exit."""
    from desmoe.distributed import is_rank0

    monitor.close()
    if is_rank0():
        print(f"preempted {where} ({preemption.signal_name or 'signal on another rank'}): "
              f"checkpoint saved, exiting for requeue", flush=True)
    announce(step, is_rank0())
    _received["signal"] = ""  # acted on: a process that runs on (a test's rank pool, a caller catching it) starts clean
    raise Preempted(step)


# Process-wide, not per trainer: a signal that arrives while no training loop runs (setup, a save, the final
# export, between the runs of a study) must still stop the next loop at its first step.
_received = {"signal": ""}


def _handle(signum, _frame) -> None:
    _received["signal"] = signal.Signals(signum).name


def arm_early() -> None:
    """Called first thing by the launchers: from then on SIGUSR1 (Slurm's warning before the time limit,
    whose default action kills the process) only sets the flag, so one that comes during imports, data
    loading or engine set-up ends in a checkpoint and a requeue instead of a failed job.  SIGTERM keeps its
    default until the loop starts: launchers and srun use it to end the peers of a rank that failed."""
    signal.signal(signal.SIGUSR1, _handle)


class Preemption:
    def __init__(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, _handle)

    @property
    def flag(self) -> bool:
        return bool(_received["signal"])

    @property
    def signal_name(self) -> str:
        return _received["signal"]

    def requested(self) -> bool:
        from desmoe.collectives import any_rank

        return any_rank(self.flag)
