"""Where the route weight is applied with expert parallelism: inside the experts' fused activation (the rows'
weights travel with them in one more all-to-all; what desmoe does) against the earlier path, the returned
rows weighted in fp32 after the reverse all-to-all (which kept that fp32 copy for backward).  Same block,
weights and inputs; interleaved rounds; each rank's thread CPU time; per-round ratio earlier / now.

    python -m torch.distributed.run --nproc_per_node 2 bench/ep_weights.py            # toy: d 256, 8 x 512, top-2
    D=512 F=192 S=256 E=128 K=8 python -m torch.distributed.run --nproc_per_node 2 bench/ep_weights.py  # Qwen3 / 4
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


@contextlib.contextmanager
def weighted_after():
    """The earlier path: the experts return unweighted rows, weighted in fp32 where they come back."""
    import desmoe.moe.dispatcher as dispatcher

    run_experts = dispatcher.ExpertDispatcher._run_experts

    def run(self, dispatched, counts, keep=None, route_w=None):
        out = run_experts(self, dispatched, counts, keep)
        return out if route_w is None else out.float() * route_w.float().unsqueeze(1)
    dispatcher.ExpertDispatcher._run_experts = run
    try:
        yield
    finally:
        dispatcher.ExpertDispatcher._run_experts = run_experts


def main() -> None:
    import argparse

    # sizes come from the environment (D, F, S, E, K, ROUNDS: every rank sees them); --help prints the usage
    argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    from desmoe.distributed import init_distributed

    init_distributed()
    torch.set_num_threads(1)
    import deepspeed.comm as dist

    from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert

    env = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
    d, f, tokens = env("D", 256), env("F", 512), env("S", 2048)
    experts, k, rounds = env("E", 8), env("K", 2), env("ROUNDS", 12)
    torch.manual_seed(0)
    block = MoEBlock(d, SwiGLUExpert(d, f), LinearRouter(d, experts, k), ep_size=dist.get_world_size())
    block.set_deepspeed_parallelism()
    block.init_experts(seed=1)
    x, grad = torch.randn(tokens, d), torch.randn(tokens, d)

    def step():
        block.zero_grad(set_to_none=True)
        block(x.clone().requires_grad_(True).unsqueeze(0)).backward(grad.unsqueeze(0))

    scrub = torch.empty(64 << 18)  # 64 MiB written before each timed step: no variant inherits warm caches
    times: dict[str, list[float]] = {"now": [], "earlier": []}
    for r in range(rounds + 2):  # two warm-up rounds
        for name, context in (("now", contextlib.nullcontext), ("earlier", weighted_after)):
            with context():
                scrub.fill_(1.0)
                dist.barrier()
                t0 = time.thread_time()
                step()
                dt = time.thread_time() - t0
            if r >= 2:
                times[name].append(dt)
    q = statistics.quantiles([a / b for a, b in zip(times["earlier"], times["now"])], n=4, method="inclusive")
    now, earlier = (statistics.median(times[n]) * 1e3 for n in ("now", "earlier"))
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: {tokens} tokens, d {d}, {experts} x {f}, top-{k}: "
          f"now {now:.1f} ms, earlier {earlier:.1f} ms, earlier / now {q[1]:.3f} [{q[0]:.3f}-{q[2]:.3f}] (median [quartiles] of {rounds} rounds)", flush=True)


if __name__ == "__main__":
    main()
