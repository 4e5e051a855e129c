"""Where the CPU experts' loop (``desmoe.kernels.experts``) spends what the expert-GEMM floor does not.

The floor of ``bench/moe_block.py`` is the experts' GEMMs alone, each writing a fresh output that the
allocator hands back hot from the previous call.  A layer must also keep its pre-activations h ([rows, 2f])
for the backward and read them there, run the activation both ways and move rows between token and expert
order.  This prints, per direction, the loop against the floor's GEMMs of that direction, the floor's forward
with h written into one kept [rows, 2f] buffer as a layer must (``floor_fwd_kept_h``), the activation's
backward on rows in cache against rows from memory, and the thread's memory bandwidth, so the gap to the floor
can be read as GEMMs vs passes vs bytes.

Per round every variant runs once, in alternating order (per-round ratios, median [quartiles]); the clock is
the thread's CPU time (one thread).  Routing: each token's top-k of random scores, as the floor's counts.

    OMP_NUM_THREADS=1 python bench/loop_split.py [--shape toy] [--rounds 30]
    OMP_NUM_THREADS=1 python bench/loop_split.py --block [--shape toy]

``--block``: instead, the whole MoE block's training step (``bench/moe_block.py``'s desmoe row) under torch's
profiler: the share of its CPU time inside the experts' loop and the ops outside it (router, dispatch, autograd).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import desmoe.kernels as kernels  # noqa: E402


def variants(shape: str) -> tuple[dict, str]:
    import moe_block

    s = moe_block.resolve(moe_block.parse(["--shape", shape]), False)
    e, d, f, tokens, k = s["experts"], s["hidden"], s["ffn"], s["tokens"], s["topk"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.rand(tokens, e, generator=gen).topk(k, -1).indices.flatten()
    counts = torch.bincount(ids, minlength=e).tolist()
    n = sum(counts)
    token_of_row = torch.argsort(ids, stable=True) // k  # expert order, as the dispatch sorts
    weights = [t for _ in range(e) for t in (torch.randn(2 * f, d, generator=gen) * 0.05,
                                             torch.randn(d, f, generator=gen) * 0.05)]
    x, grad = (torch.randn(tokens, d, generator=gen) for _ in range(2))
    route_w = torch.rand(n, generator=gen)
    loop = kernels.expert_loop_cpu()
    if loop is None:
        sys.exit("loop_split: the C expert loop is unavailable here (needs fp32 torch on MKL and a C compiler)")
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    rows = [slice(bounds[i], bounds[i + 1]) for i in range(e)]
    xr, h, gy, gh = (torch.randn(n, c, generator=gen) for c in (d, f, d, 2 * f))
    kept = torch.empty(n, 2 * f)
    w13, w2 = weights[0::2], weights[1::2]

    def loop_fwd():
        return loop.forward(x, counts, weights, route_w, token_of_row)

    def loop_bwd():  # the forward first (untimed: the returned time is the backward's alone)
        _, h_all = loop_fwd()
        t0 = time.thread_time()
        loop.backward(x, counts, weights, route_w, token_of_row, h_all, grad, None, [True] * len(weights))
        return time.thread_time() - t0

    def floor_fwd():
        for i, r in enumerate(rows):
            xr[r] @ w13[i].t(), h[r] @ w2[i].t()

    def floor_fwd_kept_h():
        for i, r in enumerate(rows):
            torch.mm(xr[r], w13[i].t(), out=kept[r]), h[r] @ w2[i].t()

    def floor_bwd():
        for i, r in enumerate(rows):
            gy[r] @ w2[i], gy[r].t() @ h[r], gh[r] @ w13[i], gh[r].t() @ xr[r]

    lib = kernels.swiglu_cpu().lib
    act_bwd = lib.swiglu_bwd_inplace_f32
    act_bwd.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    tile = max(1, min(n, (1 << 20) // (3 * f * 4)))  # rows whose h and d_act fit in 1 MiB of cache
    h_big, h_src, d_w = torch.empty(n, 2 * f), torch.randn(n, 2 * f, generator=gen), torch.empty(n)
    d_act, d_act_src = torch.empty(n, f), torch.randn(n, f, generator=gen)

    def act_bwd_memory():  # h from memory: a fresh copy, then the pass over all rows
        h_big.copy_(h_src), d_act.copy_(d_act_src)
        scrub()
        t0 = time.thread_time()
        act_bwd(h_big.data_ptr(), route_w.data_ptr(), d_act.data_ptr(), d_w.data_ptr(), 0, n, f)
        return time.thread_time() - t0

    def act_bwd_cached():  # the same rows, a block at a time, each block just copied into cache
        total = 0.0
        for r0 in range(0, n, tile):
            r1 = min(n, r0 + tile)
            h_big[r0:r1].copy_(h_src[r0:r1]), d_act[r0:r1].copy_(d_act_src[r0:r1])  # into cache (and restored)
            t0 = time.thread_time()
            act_bwd(h_big.data_ptr(), route_w.data_ptr(), d_act.data_ptr(), d_w.data_ptr(), r0, r1, f)
            total += time.thread_time() - t0
        return total

    big = torch.randn(64 << 18)  # 64 MiB
    out = torch.empty_like(big)
    mb = big.numel() * 4 / 1e6
    fns = {"loop_fwd": loop_fwd, "floor_fwd": floor_fwd, "floor_fwd_kept_h": floor_fwd_kept_h,
           "loop_bwd": loop_bwd, "floor_bwd": floor_bwd, "act_bwd_cached": act_bwd_cached,
           "act_bwd_memory": act_bwd_memory, f"read {mb:.0f} MB": lambda: big.sum(),
           f"copy {mb:.0f} MB": lambda: out.copy_(big), f"fill {mb:.0f} MB": lambda: out.fill_(1.0)}
    return fns, f"{shape}: {e} experts, d {d}, f {f}, {tokens} tokens, top-{k}, {n} rows, h {n * 2 * f * 4 / 2**20:.0f} MiB"


_scrub = None


def scrub() -> None:
    """A write of 256 MiB: nothing timed after it inherits the caches of what ran before."""
    global _scrub
    if _scrub is None:
        _scrub = torch.empty(256 << 20, dtype=torch.uint8)
    _scrub.fill_(1)


def profile_block(shape: str, steps: int = 20) -> None:
    import moe_block
    from block_variants import step_fn
    from torch.profiler import ProfilerActivity, profile

    from desmoe.distributed import init_distributed

    init_distributed()
    torch.set_num_threads(1)
    s = moe_block.resolve(moe_block.parse(["--shape", shape]), False)
    block = moe_block.build(s, torch.device("cpu"), torch.float32)["desmoe"]
    gen = torch.Generator().manual_seed(1)
    run = step_fn(block, *(torch.randn(s["tokens"], s["hidden"], generator=gen) for _ in range(2)))
    for _ in range(5):
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    ops = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)
    total = sum(a.self_cpu_time_total for a in ops) / steps / 1e3
    inside = sum(a.self_cpu_time_total for a in ops if a.key in ("GroupedSwiGLU", "GroupedSwiGLUBackward")) / steps / 1e3
    print(f"{shape} block step, {steps} steps under the profiler: {total:.1f} ms of CPU a step, {inside:.1f} ms "
          f"({inside / total:.1%}) in the experts' loop, {total - inside:.1f} ms outside it; the largest outside:")
    for a in [a for a in ops if a.key not in ("GroupedSwiGLU", "GroupedSwiGLUBackward")][:12]:
        print(f"  {a.key[:48]:<50}{a.self_cpu_time_total / steps / 1e3:7.3f} ms  ({a.count // steps} calls)")


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="toy")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--block", action="store_true", help="profile the whole block's step instead")
    args = p.parse_args()
    if args.block:
        return profile_block(args.shape)
    if args.rounds < 2:  # the quartiles of the per-round ratios need two (a traceback in statistics otherwise)
        p.error(f"--rounds {args.rounds}: expected at least 2")
    torch.set_num_threads(1)
    kernels.keep_freed_heap()  # as training does (desmoe.training): no page faults in the allocator
    fns, header = variants(args.shape)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            scrub()
            t0 = time.thread_time()
            got = fns[name]()
            times[name].append(got if isinstance(got, float) else time.thread_time() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}

    def ratio(a: str, b: str) -> str:
        q1, q2, q3 = statistics.quantiles([x / y for x, y in zip(times[a], times[b])], n=4, method="inclusive")
        return f"{q2:.2f} [{q1:.2f}-{q3:.2f}]"
    print(f"{header}; {args.rounds} rounds, load {os.getloadavg()[0]:.1f}, CPU time of one thread")
    for name, t in med.items():
        rate = f"{float(name.split()[1]) / 1e3 / t:.1f} GB/s" if name.split()[0] in ("read", "copy", "fill") else ""
        print(f"  {name:<18}{t * 1e3:9.2f} ms  {rate}")
    print(f"floor / loop, per round: forward {ratio('floor_fwd', 'loop_fwd')}, backward {ratio('floor_bwd', 'loop_bwd')}; "
          f"floor_fwd / floor_fwd_kept_h {ratio('floor_fwd', 'floor_fwd_kept_h')}; "
          f"act_bwd_memory / act_bwd_cached {ratio('act_bwd_memory', 'act_bwd_cached')}")


if __name__ == "__main__":
    main()
