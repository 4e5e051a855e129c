"""Training-step time of DES-MoE vs a plain MoE fine-tune step (FFT), same model, same process.

Both engines (DeepSpeed, ZeRO-2, FreezableAdamW) are built side by side on the same
model shape and batches; rounds alternate between them so machine load hits both
alike.  DES-MoE is timed in each phase (warm-up with ALR + KD, stabilisation with
domain experts, consolidation), and the schedule-weighted mean (0.2 / 0.5 / 0.3)
is the figure to compare with 1.05.

    python bench/desmoe_step.py [--hidden 256 --ffn 512 --experts 8 --topk 2 --layers 2 --seq 128 --batch 8]
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
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("hidden", 256), ("ffn", 512), ("experts", 8), ("topk", 2), ("layers", 2), ("heads", 4),
                          ("seq", 128), ("batch", 8), ("rounds", 12), ("alr_mult", 4)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--compute-frozen-grads", action="store_true", help="DES-MoE computes frozen weight gradients")
    p.add_argument("--json", default=None)
    return p.parse_args()


def build(args, method_name: str, data):
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.recipes.des_moe.baselines import build_method
    from desmoe.recipes.des_moe.config import DESMoEConfig
    from desmoe.models.moe_lm import MoELM, MoELMConfig

    cfg = MoELMConfig(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      max_seq_len=args.seq, num_experts=args.experts, top_k=args.topk, ffn_size=args.ffn)
    model = MoELM(cfg)
    model.setup_expert_parallel()
    dcfg = DESMoEConfig(method=method_name)
    dcfg.alr.hidden_mult = args.alr_mult
    dcfg.skip_frozen_grads = not args.compute_frozen_grads
    method = build_method(dcfg, 100, len(data.domains), aux_coef=0.01)
    parts = method.prepare_model(model)
    ds = resolve_ds_config(read_ds_config(ROOT / "configs/zero2.json"), micro_batch=args.batch, lr=1e-4)
    engine, train = build_engine(model, ds, parts=parts)
    if dcfg.skip_frozen_grads:
        method.enable_gradient_skipping(engine.module, parts)
    method.attach(engine.module, train, data, 0, 1, args.batch, args.seq)
    return engine, method


def step_once(engine, method, step: int, domain: int, batch) -> float:
    ids, dom = batch.input_ids.to(engine.device), batch.token_domain[:, :-1].to(engine.device)
    _sync(engine.device)
    t0 = time.perf_counter()
    method.begin_step(step, domain)
    method.sync_gradients()
    loss, _ = method.loss(ids)
    engine.backward(loss)
    engine.step()
    method.end_step(step, dom)
    _sync(engine.device)  # GPU work is asynchronous: time it to completion
    return time.perf_counter() - t0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from desmoe.distributed import init_distributed
    from desmoe.recipes.des_moe.domains import DomainDataConfig, StdlibDomains

    init_distributed()
    data = StdlibDomains(DomainDataConfig(domains=["email", "xml"], general=[], max_bytes_per_domain=100_000))
    streams = [data.batches("train", args.batch, args.seq, 0, 0, 1, 0, domains=[d]) for d in data.domains]
    fft, fft_m = build(args, "fft", data)
    des, des_m = build(args, "desmoe", data)
    # Phase representatives for T = 100: steps 10 (warm-up), 40 (stabilisation), 85 (consolidation).
    for s in range(20):  # warm-up steps fill the domain-expert statistics; A and M exist afterwards
        step_once(des, des_m, s, s % 2, next(streams[s % 2]))
        step_once(fft, fft_m, s, s % 2, next(streams[s % 2]))
    times = {"fft": [], "desmoe_warmup": [], "desmoe_stabilize": [], "desmoe_consolidate": []}
    for r in range(args.rounds):
        d = r % 2
        for name, step in (("fft", 50), ("desmoe_warmup", 10), ("desmoe_stabilize", 40), ("desmoe_consolidate", 85)):
            engine, method = (fft, fft_m) if name == "fft" else (des, des_m)
            times[name].append(step_once(engine, method, step, d, next(streams[d])))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    base = med["fft"]
    weighted = 0.2 * med["desmoe_warmup"] + 0.5 * med["desmoe_stabilize"] + 0.3 * med["desmoe_consolidate"]
    print(f"model: d={args.hidden} ffn={args.ffn} E={args.experts} k={args.topk} layers={args.layers} "
          f"tokens/step={args.batch * args.seq} ALR d->{args.alr_mult}d->E, {args.threads} thread(s), "
          f"median of {args.rounds} alternating rounds")
    print(f"{'step':<22}{'ms':>9}{'x FFT':>8}")
    for k, v in med.items():
        print(f"{k:<22}{v:>9.2f}{v / base:>8.3f}")
    print(f"{'desmoe (0.2/0.5/0.3)':<22}{weighted:>9.2f}{weighted / base:>8.3f}")
    if args.json:
        from desmoe.checkpoint import write_text_atomic

        write_text_atomic(args.json, json.dumps({"ms": med, "weighted_ms": weighted, "ratio": weighted / base,
                                               "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
