"""Real multi-process test ranks: a pool of spawned processes joined over gloo.

Spawning a rank imports torch + deepspeed (seconds), so the pool is started once
per test session and tests send it module-level functions to run on every rank.
Each call returns the per-rank results; an exception on any rank fails the test
with that rank's traceback.  A rank that hangs or dies poisons the pool, which is
then restarted for the next test.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

CALL_TIMEOUT_S = float(os.environ.get("DESMOE_TEST_CALL_TIMEOUT", "300"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, inbox, outbox) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        from desmoe.distributed import init_distributed

        init_distributed(timeout_s=60)
        outbox.put((rank, True, "ready"))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        outbox.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = inbox.get()
        if task is None:
            return
        fn, args, kwargs = task
        try:
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001
            outbox.put((rank, False, traceback.format_exc()))
        # A Trainer run leaves SIGTERM setting its preemption flag only; an idle rank must still die of it, or a
        # caller that exits without close() hangs for good in multiprocessing's exit (terminate, then join)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class RankPool:
    def __init__(self, world_size: int = 2) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.healthy = True
        self._collect("start-up")

    def _collect(self, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while len(results) + len(errors) < self.world_size:
            try:
                rank, ok, payload = self.outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.healthy = False
                    why = f"rank(s) {dead} died" if dead else f"no answer within {CALL_TIMEOUT_S:.0f}s"
                    raise TimeoutError(f"{what}: {why}") from None
                continue
            if ok:
                results[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                # A failing rank usually leaves its peers blocked in a collective.
                self.healthy = False
                break
        if errors:
            raise AssertionError(f"{what} failed:\n" + "\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        if not self.healthy:  # a failed call can leave a peer's answer queued: the next call would read it as its own
            raise RuntimeError("RankPool: an earlier call failed or hung; start a new pool (the ranks fixture does)")
        for box in self.inboxes:
            box.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", "call"))

    def close(self) -> None:
        for box in self.inboxes:
            try:
                box.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
