"""The SwiGLU activation's forward and backward with its rows in cache and out of it (CPU, 1 thread).

Why: at the toy shape the MoE block spends ~8 % of its step in the activation (docs/performance.md),
about twice what the same kernel costs when its rows are hot.  This prints, for the fused C kernel
(``desmoe.kernels``; ``kernel_inplace``: the backward the MoE block runs, writing d_h over the
pre-activations and the activation over d_act, on copies made before the clock starts) and the same math
on torch ops (the baseline, in the same process and rounds):
the time of one step's activation (``--experts`` blocks of ``--rows`` rows, width ``--ffn``), hot
(the block was just touched, as the forward's rows are right after their GEMM) and cold (a
``--scrub-mb`` write in between, as the backward's pre-activations are, written a whole forward and
backward of the model earlier), and the ratios cold / hot and torch ops / kernel.

    OMP_NUM_THREADS=1 python bench/activation_cache.py [--rows 512 --experts 8 --ffn 512 --rounds 15]
Clock: this thread's CPU time; each figure is the median of the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="rows per expert (toy: 2048 tokens x top-2 / 8)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--scrub-mb", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from desmoe.kernels import swiglu_cpu
    import desmoe.moe.grouped as grouped

    kernel = swiglu_cpu()
    if kernel is None:
        sys.exit("activation_cache: the fused CPU kernels are unavailable (DESMOE_FUSED_KERNELS=0 or no compiler)")
    n, f = args.rows, args.ffn
    gen = torch.Generator().manual_seed(0)
    hs = [torch.randn(n, 2 * f, generator=gen) for _ in range(args.experts)]
    w, d_act = torch.rand(n, generator=gen), torch.randn(n, f, generator=gen)
    act, d_h, d_w = torch.empty(n, f), torch.empty(n, 2 * f), torch.empty(n)
    h_work, d_work = torch.empty(n, 2 * f), torch.empty(n, f)  # kernel_inplace overwrites both
    scrub = torch.empty(args.scrub_mb << 18)

    def fused(h, backward):
        if backward:
            kernel.bwd_rows(h, w, d_act, d_h, d_w)(0, n)
        else:
            kernel.fwd_rows(h, w, act)(0, n)

    def fused_inplace(h, backward):
        if backward:
            kernel.bwd_inplace_rows(h_work, w, d_work, d_w)(0, n)
        else:
            kernel.fwd_rows(h, w, act)(0, n)

    def torch_ops(h, backward):
        saved = grouped.swiglu_cpu
        grouped.swiglu_cpu = lambda: None  # the torch-ops path of desmoe.moe.grouped, same math
        try:
            grouped._act_bwd(h, w, d_act, d_h, d_w) if backward else grouped._act_fwd(h, w, act)
        finally:
            grouped.swiglu_cpu = saved

    times: dict[str, list[float]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for impl_name, impl in (("kernel", fused), ("kernel_inplace", fused_inplace), ("torch_ops", torch_ops)):
            for state in ("hot", "cold"):
                total = 0.0
                for backward in (False, True):
                    for h in hs:
                        if impl is fused_inplace and backward:  # fresh inputs, before the scrub or touch
                            h_work.copy_(h), d_work.copy_(d_act)
                            h = h_work
                        if state == "cold":
                            scrub.fill_(r)  # evict h (and the outputs) from the caches
                        else:
                            h.sum()  # touch it, as its GEMM just did
                        t0 = time.thread_time()
                        impl(h, backward)
                        total += time.thread_time() - t0
                if r:
                    times.setdefault(f"{impl_name}_{state}", []).append(total)
    med = {k: statistics.median(v) for k, v in times.items()}
    elems = 2 * args.experts * n * f  # forward + backward
    print(f"activation fwd+bwd, {args.experts} x {n} rows x ffn {f}, 1 thread, CPU time, {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:<20}{v * 1e3:8.2f} ms {v / elems * 1e9:6.2f} ns/element")
    ratios = {"kernel_cold_over_hot": med["kernel_cold"] / med["kernel_hot"],
              "kernel_over_inplace_cold": med["kernel_cold"] / med["kernel_inplace_cold"],
              "torch_ops_over_kernel_hot": med["torch_ops_hot"] / med["kernel_hot"],
              "torch_ops_over_kernel_cold": med["torch_ops_cold"] / med["kernel_cold"]}
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return {"ms": {k: v * 1e3 for k, v in med.items()}, "ratios": ratios}


if __name__ == "__main__":
    main()
