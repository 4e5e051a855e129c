"""Forward+backward throughput of the desmoe MoE block, with baselines from the same run.

Compared, on identical experts and routing (top-k over a softmax, no renormalisation):
  * HF transformers' Qwen2-MoE sparse block, eager experts (its shared expert set to size 0);
  * plain DeepSpeed ``deepspeed.moe.layer.MoE`` (dropless, same expert module);
  * the compute floor: the experts' GEMMs alone (forward + both backward GEMMs) on the
    exact per-expert token counts, timed on this machine in this run.

    python bench/moe_block.py [--tokens 2048 --hidden 256 --ffn 512 --experts 8 --topk 2]
Prints a table and ratios; ``--json PATH`` also writes them.
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


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--json", default=None)
    return p.parse_args()


def build(args, device, dtype):
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert

    torch.manual_seed(0)
    d, f, E, k = args.hidden, args.ffn, args.experts, args.topk
    ours = MoEBlock(d, SwiGLUExpert(d, f), LinearRouter(d, E, k, normalize_topk=False))
    ours.init_experts(seed=0)
    hf_cfg = Qwen2MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=E, num_experts_per_tok=k,
                            norm_topk_prob=False, shared_expert_intermediate_size=0)
    hf_cfg._experts_implementation = "eager"
    hf = Qwen2MoeSparseMoeBlock(hf_cfg)
    ds = DeepSpeedMoE(d, SwiGLUExpert(d, f), num_experts=E, ep_size=1, k=k, drop_tokens=False, use_rts=False,
                      top2_2nd_expert_sampling=False, min_capacity=0)
    ds.set_deepspeed_parallelism()
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.proj.weight)
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.proj.weight)
        for e, expert in enumerate(ours.local_experts):
            hf.experts.gate_up_proj[e].copy_(expert.gate_up.weight)
            hf.experts.down_proj[e].copy_(expert.down.weight)
            ds.deepspeed_moe.experts.deepspeed_experts[e].load_state_dict(expert.state_dict())
    return {name: m.to(device=device, dtype=dtype) for name, m in (("desmoe", ours), ("hf_qwen2moe_eager", hf),
                                                                    ("deepspeed_moe", ds))}


def step_fn(name, module, x, grad):
    def run():
        module.zero_grad(set_to_none=True)  # as a training step does
        xi = x.detach().requires_grad_(True)
        out = module(xi.unsqueeze(0))
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad.unsqueeze(0))
    return run


def floor_fn(counts, d, f, device, dtype):
    """The experts' GEMMs only: per expert, 2 forward GEMMs and their 4 backward GEMMs."""
    mats = []
    for n in counts:
        x = torch.randn(n, d, device=device, dtype=dtype)
        w1 = torch.randn(2 * f, d, device=device, dtype=dtype)
        h = torch.randn(n, f, device=device, dtype=dtype)
        w2 = torch.randn(d, f, device=device, dtype=dtype)
        gy = torch.randn(n, d, device=device, dtype=dtype)
        gh = torch.randn(n, 2 * f, device=device, dtype=dtype)
        mats.append((x, w1, h, w2, gy, gh))

    def run():
        for x, w1, h, w2, gy, gh in mats:
            x @ w1.t()          # forward gate/up
            h @ w2.t()          # forward down
            gy @ w2             # backward: input of down
            gy.t() @ h          # backward: weight of down
            gh @ w1             # backward: input of gate/up
            gh.t() @ x          # backward: weight of gate/up
    flops = sum(2 * n * d * 2 * f + 2 * n * f * d for n in counts) * 3
    return run, flops


def timed(run, sync) -> float:
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    args = parse()
    from desmoe.distributed import init_distributed, use_cuda

    torch.set_num_threads(args.threads)
    init_distributed()  # one process; DeepSpeed's MoE needs its groups
    device = torch.device("cuda") if use_cuda() else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    blocks = build(args, device, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    grad = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    with torch.no_grad():  # same function (DeepSpeed renormalises top-k, so it is left out here)
        ref = blocks["desmoe"](x)
        diff = (blocks["hf_qwen2moe_eager"](x.unsqueeze(0))[0] - ref).abs().max().item()
    counts = blocks["desmoe"].last_stats.tokens_per_expert.tolist()
    runs = {name: step_fn(name, m, x, grad) for name, m in blocks.items()}
    floor_run, flops = floor_fn(counts, args.hidden, args.ffn, device, dtype)
    runs["floor_expert_gemms"] = floor_run
    times = {name: [] for name in runs}
    for _ in range(3):
        for run in runs.values():
            run()
    for _ in range(args.rounds):  # interleaved, so drift hits every variant alike
        for name, run in runs.items():
            times[name].append(timed(run, sync))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads} threads",
        "dtype": str(dtype).replace("torch.", ""), "shape": vars(args) | {"json": None},
        "max_abs_diff_vs_hf": diff,
        "tokens_per_s": {n: args.tokens / t for n, t in med.items() if n != "floor_expert_gemms"},
        "median_ms": {n: 1e3 * t for n, t in med.items()},
        "matmul_gflops": flops / med["floor_expert_gemms"] / 1e9,
        "speedup_vs_hf_eager": med["hf_qwen2moe_eager"] / med["desmoe"],
        "speedup_vs_deepspeed_moe": med["deepspeed_moe"] / med["desmoe"],
        "share_of_floor": {n: med["floor_expert_gemms"] / t for n, t in med.items() if n != "floor_expert_gemms"},
    }
    print(f"device {result['device']}, {result['dtype']}, {args.tokens} tokens, d={args.hidden}, ffn={args.ffn}, "
          f"{args.experts} experts, top-{args.topk}; desmoe vs HF max |diff| = {diff:.2e}")
    print(f"{'variant':<22}{'median ms':>10}{'tokens/s':>12}{'share of floor':>16}")
    for name, t in med.items():
        share = "" if name == "floor_expert_gemms" else f"{result['share_of_floor'][name]:.1%}"
        tps = "" if name == "floor_expert_gemms" else f"{args.tokens / t:,.0f}"
        print(f"{name:<22}{1e3 * t:>10.2f}{tps:>12}{share:>16}")
    print(f"expert GEMMs run at {result['matmul_gflops']:.1f} GFLOP/s; desmoe is "
          f"{result['speedup_vs_hf_eager']:.2f}x HF eager and {result['speedup_vs_deepspeed_moe']:.2f}x DeepSpeed MoE")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from desmoe.checkpoint import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
