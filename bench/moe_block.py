"""Forward+backward time of the desmoe MoE block at real layer shapes, against every baseline in the same run.

Variants, on identical expert weights and routing (the router's top-k over a softmax):
  * desmoe (its default backend on the platform) and each grouped-experts backend forced:
    ``loop`` (one GEMM per expert) and ``grouped_mm`` (one grouped kernel per GEMM); on CPU also
    ``desmoe_unfused_rows``: the dispatch's gather and combine as whole-batch passes around the experts
    (row kernels), not inside their loop; ``desmoe_torch_permute``: those passes on torch ops;
    ``desmoe_python_loop``: the experts' loop in Python over ``torch.mm`` instead of ``desmoe.kernels.experts``;
  * transformers' Qwen2-MoE sparse block with each experts implementation it offers here
    (``eager``, ``batched_mm``, ``grouped_mm``; ``batched_mm`` gathers one weight matrix per
    route, so it is skipped where that would not fit in memory); the fastest is "HF fastest";
  * DeepSpeed's ``deepspeed.moe.layer.MoE`` (dropless: every expert padded to the largest count);
  * the floor: the experts' GEMMs alone (2 forward, 4 backward per expert, shared experts as
    experts over every token) on the exact per-expert token counts, as a loop of GEMMs and,
    where torch has it, as grouped GEMMs; the faster one is the floor.  ``gemms_fwd_bwd``: the same
    GEMMs in a layer's order (all forwards, then all backwards), what a layer could reach at best;
  * on CPU every timed run starts after a write of ``--scrub-mb`` MiB, so that no variant inherits
    the caches of the one before it (desmoe_loop after desmoe shares its weights).

Shapes (``--shape``): toy (d 256, 8 x 512, top-2), dsv2-lite (d 2048, 64 x 1408 + 2 shared,
top-6), qwen3-30b-a3b (d 2048, 128 x 768, top-8), mixtral (d 4096, 8 x 14336, top-2).  On a CPU
the real shapes run 256 tokens and a quarter of their width (printed in the header): at full width the
six variants' weights and gradients (about 5 GB each for Qwen3's 128 experts) exceed a dev box's memory.

    python bench/moe_block.py [--shape toy|dsv2-lite|qwen3-30b-a3b|mixtral] [--tokens N] [--rounds R]
``--before REV`` adds ``desmoe_before``: the experts' autograd code as of a git revision, same weights and
routing, so a change to it is measured as a per-round ratio in one process.
Prints one table (median and fastest of the interleaved rounds, the spread = interquartile range / median,
tokens/s, share of the floor, peak memory) and the ratios, each the median [quartiles] of the per-round
ratios (a round runs every variant back to back, so drift cancels in the pair); ``--json PATH``
also writes them.  With one CPU thread the clock is the thread's CPU time (``--clock``).
Peak memory: CUDA's peak allocation during the step, above what was allocated before
it; on CPU the bytes the forward keeps for backward (torch has no CPU allocator statistics).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from block_variants import FORCED, experts_from, grouped_at, step_fn  # noqa: E402

# name: (hidden, expert ffn, experts, top-k, shared ffn, renormalise top-k, GPU tokens, CPU tokens, CPU width divisor)
SHAPES = {
    "toy": (256, 512, 8, 2, 0, False, 2048, 2048, 1),
    "dsv2-lite": (2048, 1408, 64, 6, 2 * 1408, False, 8192, 256, 4),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 0, True, 8192, 256, 4),
    "mixtral": (4096, 14336, 8, 2, 0, True, 8192, 256, 4),
}
HF_IMPLS = ("eager", "batched_mm", "grouped_mm")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="toy")
    p.add_argument("--tokens", type=int, default=None, help="default: per shape and platform")
    for name in ("hidden", "ffn", "experts", "topk"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the shape's value")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15 toy, 4 real shapes on CPU)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="cpu: this thread's CPU time (auto with 1 CPU thread: a loaded machine's preemption "
                        "does not count); wall: elapsed time (auto on CUDA and with several threads)")
    p.add_argument("--scrub-mb", type=int, default=256,
                   help="CPU: write this many MiB before each timed run, so no variant inherits the previous "
                        "one's caches (warm weights made the same code 1.2x faster at 128 experts); 0: off")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--skip", default="", help="comma-separated variants to leave out")
    p.add_argument("--before", default=None, metavar="REV",
                   help="also run desmoe_before: the experts' autograd code (desmoe/moe/grouped.py) as of git "
                        "revision REV, on the same weights and routing, for a before/after ratio in one process")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def resolve(args, cuda: bool) -> dict:
    d, f, E, k, shared, norm, gpu_tokens, cpu_tokens, div = SHAPES[args.shape]
    if not cuda:
        d, f, shared = d // div, f // div, shared // div
    return {"hidden": args.hidden or d, "ffn": args.ffn or f, "experts": args.experts or E, "topk": args.topk or k,
            "shared": shared, "normalize": norm, "tokens": args.tokens or (gpu_tokens if cuda else cpu_tokens),
            "scaled_width": 1 if cuda else div}


class _SharedWrap(torch.nn.Module):
    """DeepSpeed's layer plus the same gated shared expert the other variants run."""

    def __init__(self, moe, shared, gate):
        super().__init__()
        self.moe, self.shared, self.gate = moe, shared, gate

    def forward(self, x):
        out = self.moe(x)[0]
        if self.shared is not None:
            flat = x.reshape(-1, x.shape[-1])
            out = out + (torch.sigmoid(self.gate(flat)) * self.shared(flat)).reshape(out.shape)
        return out


def build(s: dict, device, dtype) -> dict:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert

    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: Mixtral's full-width variants are 1.4 B weights each
        return _build(s, device, dtype, DeepSpeedMoE, Qwen2MoeConfig, Qwen2MoeSparseMoeBlock, LinearRouter, MoEBlock,
                      SwiGLUExpert)


def _build(s, device, dtype, DeepSpeedMoE, Qwen2MoeConfig, Qwen2MoeSparseMoeBlock, LinearRouter, MoEBlock,
           SwiGLUExpert) -> dict:
    d, f, E, k, sf = s["hidden"], s["ffn"], s["experts"], s["topk"], s["shared"]
    shared = SwiGLUExpert(d, sf) if sf else None
    ours = MoEBlock(d, SwiGLUExpert(d, f), LinearRouter(d, E, k, normalize_topk=s["normalize"]), shared=shared,
                    shared_gate=shared is not None)
    if device.type == "cpu":  # seeded per global expert (drawn on the CPU); elsewhere nn.Linear's own init will do,
        ours.init_experts(seed=0)  # every variant copies these weights either way
    blocks = {"desmoe": ours}
    for impl in HF_IMPLS:
        cfg = Qwen2MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=E, num_experts_per_tok=k,
                             norm_topk_prob=s["normalize"], shared_expert_intermediate_size=sf)
        cfg._experts_implementation = impl
        hf = Qwen2MoeSparseMoeBlock(cfg)
        with torch.no_grad():
            hf.gate.weight.copy_(ours.router.proj.weight)
            for e, expert in enumerate(ours.local_experts):
                hf.experts.gate_up_proj[e].copy_(expert.gate_up.weight)
                hf.experts.down_proj[e].copy_(expert.down.weight)
            if shared is not None:
                hf.shared_expert.gate_proj.weight.copy_(shared.gate_up.weight[:sf])
                hf.shared_expert.up_proj.weight.copy_(shared.gate_up.weight[sf:])
                hf.shared_expert.down_proj.weight.copy_(shared.down.weight)
                hf.shared_expert_gate.weight.copy_(ours.shared_gate.weight)
        blocks[f"hf_{impl}"] = hf
    ds = DeepSpeedMoE(d, SwiGLUExpert(d, f), num_experts=E, ep_size=1, k=k, drop_tokens=False, use_rts=False,
                      top2_2nd_expert_sampling=False, min_capacity=0)
    ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.proj.weight)
        for e, expert in enumerate(ours.local_experts):
            ds.deepspeed_moe.experts.deepspeed_experts[e].load_state_dict(expert.state_dict())
    blocks["deepspeed_moe"] = _SharedWrap(ds, shared, ours.shared_gate)
    return {n: m.to(device=device, dtype=dtype) for n, m in blocks.items()}


def floor_fns(counts, d, f, device, dtype):
    """The experts' GEMMs only, per expert 2 forward and 4 backward: as a loop and grouped (the floor), and
    ``gemms_fwd_bwd``: the same GEMMs in a layer's order, all forwards then all backwards.  The floor loop
    runs an expert's six GEMMs back to back, so its weights are read from cache five times out of six; a
    layer's backward comes after the rest of the model's forward, when the weights have left the cache."""
    n_all = sum(counts)
    x, h, gy = (torch.randn(n_all, c, device=device, dtype=dtype) for c in (d, f, d))
    gh = torch.randn(n_all, 2 * f, device=device, dtype=dtype)
    w1 = torch.randn(len(counts), 2 * f, d, device=device, dtype=dtype)
    w2 = torch.randn(len(counts), d, f, device=device, dtype=dtype)
    bounds = [0]
    for n in counts:
        bounds.append(bounds[-1] + n)

    def loop():
        for e in range(len(counts)):
            r = slice(bounds[e], bounds[e + 1])
            x[r] @ w1[e].t(), h[r] @ w2[e].t(), gy[r] @ w2[e], gy[r].t() @ h[r], gh[r] @ w1[e], gh[r].t() @ x[r]

    def fwd_then_bwd():  # the order a layer must keep: every expert's forward, later every expert's backward
        for e in range(len(counts)):
            r = slice(bounds[e], bounds[e + 1])
            x[r] @ w1[e].t(), h[r] @ w2[e].t()
        for e in range(len(counts)):
            r = slice(bounds[e], bounds[e + 1])
            gy[r] @ w2[e], gy[r].t() @ h[r], gh[r] @ w1[e], gh[r].t() @ x[r]

    offs = torch.tensor(bounds[1:], device=device, dtype=torch.int32)

    def grouped():
        g = torch._grouped_mm
        g(x, w1.transpose(1, 2), offs=offs), g(h, w2.transpose(1, 2), offs=offs), g(gy, w2, offs=offs)
        g(gy.t(), h, offs=offs), g(gh, w1, offs=offs), g(gh.t(), x, offs=offs)
    flops = sum(2 * n * d * 2 * f + 2 * n * f * d for n in counts) * 3
    fns = {"floor_loop": loop, "gemms_fwd_bwd": fwd_then_bwd}
    if hasattr(torch, "_grouped_mm") and (device.type == "cpu" or dtype == torch.bfloat16):
        fns["floor_grouped"] = grouped
    return fns, flops


def peak_memory(run, device) -> float:
    """MB: CUDA peak above the starting allocation; CPU: unique storage bytes saved for backward."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values()) / 2 ** 20


def timed(run, sync, clock=time.perf_counter) -> float:
    sync()
    t0 = clock()
    run()
    sync()
    return clock() - t0


def pick_clock(name: str, cuda: bool, threads: int):
    """One CPU thread: its CPU time is the step's work, and a shared machine's preemption is left out
    (wall-clock rounds of the same code differed by 1.4x at load 10); otherwise wall-clock."""
    if name == "cpu" or (name == "auto" and not cuda and threads == 1):
        return time.thread_time, "cpu time"
    return time.perf_counter, "wall"


def quartiles(values) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[1], q[2]


def _available_ram() -> int:
    """MemAvailable (free + reclaimable cache); the free-page count alone ignores the page cache."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def hf_batched_bytes(s, itemsize) -> int:
    """batched_mm gathers [routes, 3 f, d] of weights, and its backward as much again."""
    return 2 * s["tokens"] * s["topk"] * 3 * s["ffn"] * s["hidden"] * itemsize


def main(argv=None) -> dict:
    args = parse(argv)
    from desmoe.distributed import init_distributed, use_cuda

    init_distributed()  # (it sets CPU threads from the rank count: --threads is applied after it)
    torch.set_num_threads(args.threads)
    cuda = use_cuda()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    s = resolve(args, cuda)
    rounds = args.rounds or (15 if args.shape == "toy" or cuda else 6)
    weights = 2 * 3 * s["hidden"] * (s["experts"] * s["ffn"] + s["shared"]) * torch.finfo(dtype).bits // 8
    avail = torch.cuda.mem_get_info()[0] if cuda else _available_ram()
    if 6 * weights > avail / 2:  # six copies (desmoe, 3 HF, DeepSpeed, floor), weights + gradients
        sys.exit(f"moe_block: {args.shape} needs about {6 * weights / 2**30:.1f} GiB for its variants' weights and "
                 f"gradients, more than half of the {avail / 2**30:.1f} GiB free: use --hidden/--ffn/--experts")
    blocks = build(s, device, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(s["tokens"], s["hidden"], generator=gen).to(device, dtype)
    grad = torch.randn(s["tokens"], s["hidden"], generator=gen).to(device, dtype)
    skipped = {n: "--skip" for n in args.skip.split(",") if n}
    with torch.no_grad():  # same function; DeepSpeed renormalises top-k, so it is checked only where we do too
        ref = blocks["desmoe"](x.unsqueeze(0))[0]
        diff = {n: (blocks[n](x.unsqueeze(0))[0] - ref).abs().max().item() for n in ("hf_eager", "deepspeed_moe")
                if n != "deepspeed_moe" or s["normalize"]}
    counts = blocks["desmoe"].last_stats.tokens_per_expert.tolist()
    free = torch.cuda.mem_get_info()[0] if cuda else _available_ram()
    need = hf_batched_bytes(s, x.element_size())
    if need > free / 3:
        skipped["hf_batched_mm"] = f"would gather {need / 2**30:.1f} GiB of per-route weights"
    runs = {}
    for name, module in blocks.items():
        if name not in skipped:
            runs[name] = step_fn(module, x, grad)
            if name == "desmoe":
                for forced in ("loop", "grouped_mm", "unfused_rows") + (() if cuda else ("torch_permute", "python_loop")):
                    if f"desmoe_{forced}" not in skipped and hasattr(torch, "_grouped_mm"):
                        runs[f"desmoe_{forced}"] = step_fn(module, x, grad, FORCED[forced])
                if args.before:
                    before = grouped_at(args.before)
                    runs["desmoe_before"] = step_fn(module, x, grad, lambda: experts_from(before))
    floor_counts = counts + ([s["tokens"]] if s["shared"] else [])
    floors, flops = floor_fns(counts, s["hidden"], s["ffn"], device, dtype)
    if s["shared"]:  # the shared experts are one more expert over every token (width = their sum)
        sh_floors, sh_flops = floor_fns([s["tokens"]], s["hidden"], s["shared"], device, dtype)
        floors = {n: (lambda a=fn, b=sh_floors[n]: (a(), b())) for n, fn in floors.items()}
        flops += sh_flops
    runs.update(floors)
    errors = {}
    for name in list(runs):  # warm-up; a baseline that fails here is reported, not fatal
        try:
            runs[name](), runs[name]()
        except Exception as err:  # noqa: BLE001
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
            del runs[name]
    clock, clock_name = pick_clock(args.clock, cuda, args.threads)
    times = {name: [] for name in runs}
    scrub = torch.empty(args.scrub_mb << 18) if args.scrub_mb and not cuda else None  # float32: MiB x 2^18
    for _ in range(rounds):  # interleaved, so drift hits every variant alike
        for name, run in runs.items():
            if scrub is not None:  # every variant starts with cold caches, as a layer does in a model
                scrub.fill_(1.0)
            times[name].append(timed(run, sync, clock))
    med = {n: statistics.median(t) for n, t in times.items()}
    best = {n: min(t) for n, t in times.items()}
    mem = {n: peak_memory(r, device) for n, r in runs.items() if not n.startswith(("floor", "gemms"))}
    floor_name = min((n for n in med if n.startswith("floor")), key=med.get)
    hf = [n for n in med if n.startswith("hf_")]
    hf_fastest = min(hf, key=med.get) if hf else None

    def paired(num: str, den: str):
        """Per-round ratio times[num] / times[den] (same round, adjacent in time): median and quartiles."""
        if num not in times or den not in times:
            return None
        q1, q2, q3 = quartiles([a / b for a, b in zip(times[num], times[den])])
        return {"median": q2, "q1": q1, "q3": q3}
    ratios = {"vs_hf_fastest": paired(hf_fastest, "desmoe") if hf_fastest else None,
              "vs_deepspeed_moe": paired("deepspeed_moe", "desmoe"),
              "share_of_floor": paired(floor_name, "desmoe"),
              "share_of_gemms_fwd_bwd": paired("gemms_fwd_bwd", "desmoe"),
              "vs_before": paired("desmoe_before", "desmoe"),
              "vs_unfused_rows": paired("desmoe_unfused_rows", "desmoe"),
              "vs_python_loop": paired("desmoe_python_loop", "desmoe")}
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu x{args.threads} threads",
        "dtype": str(dtype).replace("torch.", ""), "shape": args.shape, "resolved": s, "rounds": rounds,
        "clock": clock_name, "load": os.getloadavg(), "max_abs_diff_vs_desmoe": diff, "per_expert_tokens": counts,
        "median_ms": {n: 1e3 * t for n, t in med.items()}, "min_ms": {n: 1e3 * t for n, t in best.items()},
        "rounds_ms": {n: [1e3 * t for t in ts] for n, ts in times.items()},
        "peak_mb": mem, "floor": floor_name, "floor_tflops": flops / med[floor_name] / 1e12,
        "hf_fastest": hf_fastest, "skipped": skipped, "failed": errors, "paired_ratios": ratios,
        "speedup_vs_hf_fastest": ratios["vs_hf_fastest"]["median"] if ratios["vs_hf_fastest"] else None,
        "speedup_vs_deepspeed_moe": ratios["vs_deepspeed_moe"]["median"] if ratios["vs_deepspeed_moe"] else None,
        "share_of_floor": {n: statistics.median(f / t for f, t in zip(times[floor_name], times[n])) for n in times},
    }
    print(f"== {args.shape}: {result['device']}, {result['dtype']}, {s['tokens']} tokens, d={s['hidden']}, "
          f"{s['experts']} experts x {s['ffn']}" + (f" + shared {s['shared']}" if s["shared"] else "")
          + f", top-{s['topk']}" + (f" (width / {s['scaled_width']} on CPU)" if s["scaled_width"] > 1 else "")
          + f"; {rounds} rounds, {clock_name}; load {result['load'][0]:.1f}; max |diff| vs desmoe {diff}")
    print(f"{'variant':<20}{'median ms':>11}{'min ms':>9}{'spread':>8}{'tokens/s':>12}{'of floor':>10}{'peak MB':>10}")
    for n, t in sorted(med.items(), key=lambda kv: kv[1]):
        q1, _, q3 = quartiles(times[n])
        tps = "" if n.startswith(("floor", "gemms")) else f"{s['tokens'] / t:,.0f}"
        m = f"{mem[n]:.0f}" if n in mem else ""
        print(f"{n:<20}{1e3 * t:>11.2f}{1e3 * best[n]:>9.2f}{(q3 - q1) / t:>8.0%}{tps:>12}"
              f"{result['share_of_floor'][n]:>10.1%}{m:>10}")
    for n, why in {**skipped, **errors}.items():
        print(f"{n:<20} not run: {why}")
    fmt = lambda r: f"{r['median']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}]" if r else "n/a"  # noqa: E731
    print(f"floor = {floor_name} ({result['floor_tflops'] * 1e3:.1f} GFLOP/s).  desmoe, per-round ratios, median "
          f"[quartiles]: {fmt(ratios['vs_hf_fastest'])}x HF fastest ({hf_fastest}), "
          f"{fmt(ratios['vs_deepspeed_moe'])}x DeepSpeed MoE, {fmt(ratios['share_of_floor'])} of the floor, "
          f"{fmt(ratios['share_of_gemms_fwd_bwd'])} of the same GEMMs in a layer's order (gemms_fwd_bwd)"
          + (f", {fmt(ratios['vs_before'])}x desmoe as of {args.before} (desmoe_before)" if args.before else "")
          + (f", {fmt(ratios['vs_unfused_rows'])}x desmoe_unfused_rows" if ratios["vs_unfused_rows"] else "")
          + (f", {fmt(ratios['vs_python_loop'])}x desmoe_python_loop" if ratios["vs_python_loop"] else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from desmoe.checkpoint import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
