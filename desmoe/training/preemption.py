"""Save-and-exit on preemption, agreed by every rank at a step boundary.

Slurm asks for a signal before the time limit (``#SBATCH --signal=USR1@120``)
and schedulers send SIGTERM before preempting.  The handler only sets a flag;
the training loop calls :meth:`Preemption.requested` once per step, which
all-reduces the flag so every rank stops at the *same* step (signals reach ranks
at different moments), saves a checkpoint and exits with ``EXIT_PREEMPTED``.
The Slurm script requeues the job on that code; the requeued job resumes from
the checkpoint.
"""
from __future__ import annotations

import signal

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    def __init__(self, step: int) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class Preemption:
    def __init__(self) -> None:
        self.flag = False
        self.signal_name = ""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        import deepspeed.comm as dist

        flag = torch.tensor([1.0 if self.flag else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
