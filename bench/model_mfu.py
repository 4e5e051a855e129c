"""Model-level MFU of a training step (active parameters) for the embedded and the upcycled bases.

    python bench/model_mfu.py [--models embedded,smollm2-135m-moe4,smollm2-360m-moe4] [--seq 1024 --batch 8]

Each model is the HF model desmoe trains (``desmoe.models.hf_moe.load_hf_moe``: HF attention and
norms, desmoe MoE blocks), randomly initialised at the base's shape -- MFU depends on shapes, not
on weight values, and a GPU machine cannot download the real weights:
  embedded            configs/pretrain_base.yaml's DeepSeek-V2-style MoE (d 256, 16 x 256 + shared, top-2)
  smollm2-135m-moe4   SmolLM2-135M upcycled to Mixtral layout, 4 experts top-2 (docs/models.md's GPU base)
  smollm2-360m-moe4   SmolLM2-360M upcycled the same way (the largest that fits the 8-minute check)
Step = forward + backward + AdamW (bf16 on CUDA, fp32 on CPU; one process, no ZeRO).
FLOPs per token = 6 x active parameters (non-embedding weights, the LM head, the router and
top-k experts' weights) + 12 x layers x seq x attention width (Megatron's convention: causal
attention counted in full).  MFU = achieved / the card's dense bf16 peak; on a CPU, against the
fp32 GEMM rate measured in the same run (no vendor peak applies there).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# name: MoEModelSpec fields, vocabulary
MODELS = {
    "embedded": (dict(arch="deepseek_v2", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, num_experts=16,
                      top_k=2, expert_ffn=256, shared_ffn=256, dense_ffn=768, first_dense_layers=1), 8000),
    "smollm2-135m-moe4": (dict(arch="mixtral", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                               num_experts=4, top_k=2, expert_ffn=1536), 49152),
    "smollm2-360m-moe4": (dict(arch="mixtral", hidden_size=960, num_layers=32, num_heads=15, num_kv_heads=5,
                               num_experts=4, top_k=2, expert_ffn=2560), 49152),
}
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}


def parse(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated (default: all on CUDA, embedded + 135m on CPU)")
    p.add_argument("--seq", type=int, default=None, help="default 1024 on CUDA, 256 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6 on CUDA, 3 on CPU)")
    p.add_argument("--cache", default=os.environ.get("DESMOE_MFU_CACHE", str(Path(tempfile.gettempdir()) / "desmoe-mfu")))
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def peak(device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16.items():  # "H100 PCIe" is listed before "H100"
            if key in name:
                return value, f"{name} dense bf16 peak"
        return gemm_rate(device, torch.bfloat16), f"{name}: measured bf16 GEMM rate (no listed peak)"
    return gemm_rate(device, torch.float32), "this CPU's measured fp32 GEMM rate"


def gemm_rate(device, dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    times = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def active_params(model, cfg) -> int:
    from desmoe.moe import moe_blocks

    blocks = moe_blocks(model)
    expert_ids = {id(p) for b in blocks for p in b.local_experts.parameters()}
    embed = model.get_input_embeddings().weight
    dense = sum(p.numel() for p in model.parameters() if id(p) not in expert_ids and p is not embed)
    head = model.get_output_embeddings().weight
    dense += head.numel() if head is embed else 0  # tied: the LM head GEMM still runs
    per_expert = [sum(p.numel() for p in b.local_experts[0].parameters()) for b in blocks]
    return dense + sum(b.router.k * n for b, n in zip(blocks, per_expert))


def build(name: str, cache: Path, dtype, device):
    from desmoe.models.hf_build import MoEModelSpec, hf_config, write_initial_checkpoint
    from desmoe.models.hf_moe import load_hf_moe

    fields, vocab = MODELS[name]
    spec = MoEModelSpec(**fields, max_seq_len=4096)
    path = cache / name
    if not (path / "config.json").is_file():  # random weights at the base's shape, written once
        write_initial_checkpoint(hf_config(spec, vocab), path, seed=0)
    model = load_hf_moe(path, dtype=dtype).to(device)
    return model, model.config, vocab


def measure(name, args, device, dtype) -> dict:
    model, cfg, vocab = build(name, Path(args.cache), dtype, device)
    model.train()
    seq, batch = args.seq, args.batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (batch, seq), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step(), step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    n_active = active_params(model, cfg)
    attn = getattr(cfg, "num_attention_heads") * (getattr(cfg, "v_head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    flops_tok = 6 * n_active + 12 * cfg.num_hidden_layers * seq * attn
    tokens = batch * seq
    total = sum(p.numel() for p in model.parameters())
    res = {"model": name, "params": total, "active_params": n_active, "tokens_per_step": tokens,
           "step_ms": 1e3 * t, "tokens_per_s": tokens / t, "tflops": flops_tok * tokens / t / 1e12,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None}
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> dict:
    args = parse(argv)
    from desmoe.distributed import init_distributed, use_cuda

    init_distributed()  # one process: the MoE blocks need DeepSpeed's groups
    cuda = use_cuda()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    args.seq = args.seq or (1024 if cuda else 256)
    args.batch = args.batch or (8 if cuda else 2)
    args.steps = args.steps or (6 if cuda else 3)
    names = (args.models or (",".join(MODELS) if cuda else "embedded,smollm2-135m-moe4")).split(",")
    peak_flops, peak_what = peak(device)
    rows = []
    for name in names:
        try:
            r = measure(name, args, device, dtype)
            r["mfu"] = r["tflops"] * 1e12 / peak_flops
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: report, go on with the next model
            r = {"model": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}", "mfu": None}
        rows.append(r)
        print(f"[model_mfu] {name}: " + (r['error'] if r.get('error') else
              f"{r['tflops']:.2f} TFLOP/s, MFU {r['mfu']:.1%}"), flush=True)  # survives a timeout later
    result = {"device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads",
              "dtype": str(dtype).replace("torch.", ""), "seq": args.seq, "batch": args.batch,
              "peak_tflops": peak_flops / 1e12, "peak": peak_what, "load": os.getloadavg(), "models": rows}
    print(f"{result['device']}, {result['dtype']}, batch {args.batch} x seq {args.seq}; MFU against {peak_what} "
          f"({peak_flops / 1e12:.1f} TFLOP/s); load {result['load'][0]:.1f}")
    print(f"{'model':<20}{'params':>9}{'active':>9}{'step ms':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>8}")
    for r in rows:
        if r.get("error"):
            print(f"{r['model']:<20} failed: {r['error']}")
            continue
        print(f"{r['model']:<20}{r['params'] / 1e6:>8.0f}M{r['active_params'] / 1e6:>8.0f}M{r['step_ms']:>10.1f}"
              f"{r['tokens_per_s']:>11,.0f}{r['tflops']:>9.2f}{r['mfu']:>8.1%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
