"""What one agreed flag costs per training step: the trainer runs two one-element all-reduces a step (the
finite check, `Trainer.check_finite`, and the preemption check, `Preemption.requested`).  Times `rounds` of
them on 2 local ranks (gloo, CPU), each as the trainer does it: a fresh one-element tensor, MAX, `.item()`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/flag_allreduce.py [--rounds 3000]

Compare the printed figure with a step's time (TensorBoard's perf/train_s over the steps) to see what
merging the two into one collective would save."""
import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(rank: int, port: int, rounds: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for _ in range(200):  # warm-up: connections, allocator
        dist.all_reduce(torch.zeros(1), op=dist.ReduceOp.MAX)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(rounds):
        flag = torch.tensor([0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        flag.item()
    per = (time.perf_counter() - t0) / rounds
    if rank == 0:
        print(f"one-flag all-reduce, gloo, 2 ranks: {per * 1e6:.0f} us each (load {os.getloadavg()[0]:.1f}); "
              f"two a step: {2 * per * 1e3:.2f} ms a step")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3000)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(port, args.rounds), nprocs=2)


if __name__ == "__main__":
    main()
