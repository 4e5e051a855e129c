"""Cost growth of the desmoe MoE block: forward+backward time vs tokens, vs number of experts, vs top-k.

    python bench/moe_growth.py [--hidden 256 --ffn 512] [--rounds 5]

Each sweep varies one factor from the toy shape (1024 tokens, 8 experts, top-2) and times desmoe and
the expert-GEMM floor on the same routing, interleaved in this process (medians; one CPU thread:
its CPU time, as bench/moe_block.py).  The routed work is
tokens x top-k rows through one expert each, so time should grow linearly in tokens and in top-k
and stay flat in the number of experts (same rows, more and smaller GEMMs); "x first" divides by
the sweep's first point and "linear" is what proportional growth would give.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import moe_block  # noqa: E402
from block_variants import step_fn  # noqa: E402


def point(d, f, E, k, tokens, rounds, device, dtype, sync, clock=time.perf_counter):
    from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert

    torch.manual_seed(0)
    block = MoEBlock(d, SwiGLUExpert(d, f), LinearRouter(d, E, k)).to(device, dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    g = torch.randn_like(x)
    with torch.no_grad():
        block(x)
    counts = block.last_stats.tokens_per_expert.tolist()
    floors, _ = moe_block.floor_fns(counts, d, f, device, dtype)
    runs = {"desmoe": step_fn(block, x, g), "floor": floors["floor_loop"]}
    for r in runs.values():
        r()
    times = {n: [] for n in runs}
    for _ in range(rounds):
        for n, r in runs.items():
            times[n].append(moe_block.timed(r, sync, clock))
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from desmoe.distributed import init_distributed, use_cuda

    init_distributed()  # (it sets CPU threads from the rank count: --threads is applied after it)
    torch.set_num_threads(args.threads)
    cuda = use_cuda()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock, clock_name = moe_block.pick_clock("auto", cuda, args.threads)
    base = {"tokens": 1024 * (8 if cuda else 1), "experts": 8, "topk": 2}
    sweeps = {"tokens": [base["tokens"] // 2, base["tokens"], base["tokens"] * 2],
              "experts": [8, 16, 32, 64], "topk": [1, 2, 4]}
    rows = []
    print(f"{'sweep':<8}{'value':>7}{'desmoe ms':>11}{'x first':>9}{'linear':>8}{'floor ms':>10}{'of floor':>10}")
    for factor, values in sweeps.items():
        first = None
        for v in values:
            cfg = dict(base, **{factor: v})
            t = point(args.hidden, args.ffn, cfg["experts"], cfg["topk"], cfg["tokens"], args.rounds, device, dtype,
                      sync, clock)
            first = first or (t["desmoe"], v)
            linear = 1.0 if factor == "experts" else v / first[1]
            row = {"sweep": factor, "value": v, "desmoe_ms": 1e3 * t["desmoe"], "floor_ms": 1e3 * t["floor"],
                   "x_first": t["desmoe"] / first[0], "linear": linear, "share_of_floor": t["floor"] / t["desmoe"]}
            rows.append(row)
            print(f"{factor:<8}{v:>7}{row['desmoe_ms']:>11.2f}{row['x_first']:>9.2f}{linear:>8.2f}"
                  f"{row['floor_ms']:>10.2f}{row['share_of_floor']:>10.1%}")
    print(f"device {'cuda' if cuda else f'cpu x{args.threads}'}, {dtype}, d {args.hidden}, ffn {args.ffn}; "
          f"medians of {args.rounds} rounds, {clock_name}; "
          f"load {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
