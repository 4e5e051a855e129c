"""Cost of the MoE block's weight-gradient mask and slot redirection, vs the plain block, same process.

Forward + backward of one MoEBlock (SwiGLU experts, grouped fast path, EP=1) on the
same tokens and routing:
  * plain: no mask, no slots (the baseline);
  * mask: ``weight_grad_mask`` with half of the (token, expert) pairs masked (DES-MoE Eq. 8);
  * slots: ``route_slots`` sending every route to its own expert (the copies' redirection, no change);
  * average: ``slot_fanout`` with one copy per expert (two expert calls per route, inference reading).
Rounds alternate between the variants so machine load hits all alike.

    python bench/grad_mask.py [--tokens 2048 --hidden 256 --ffn 512 --experts 8 --topk 2 --rounds 15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("tokens", 2048), ("hidden", 256), ("ffn", 512), ("experts", 8), ("topk", 2),
                          ("rounds", 15), ("threads", 1)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert

    torch.manual_seed(0)
    d, E, S = args.hidden, args.experts, args.tokens
    block = MoEBlock(d, SwiGLUExpert(d, args.ffn), LinearRouter(d, E, args.topk))
    block.init_experts(seed=0)
    gen = torch.Generator().manual_seed(1)
    x, grad = torch.randn(S, d, generator=gen), torch.randn(S, d, generator=gen)
    mask = torch.rand(S, E, generator=gen) < 0.5
    same_slots = torch.arange(E).expand(S, E).contiguous()
    fanout = torch.stack([torch.arange(E), torch.arange(E)], dim=1)  # each expert averaged with itself

    def variant(mask_=None, slots=None, fan=None):
        def run():
            block.zero_grad(set_to_none=True)
            block.weight_grad_mask, block.route_slots, block.slot_fanout = mask_, slots, fan
            xi = x.detach().requires_grad_(True)
            block(xi).backward(grad)
            block.weight_grad_mask = block.route_slots = block.slot_fanout = None
        return run

    runs = {"plain": variant(), "mask": variant(mask_=mask), "slots": variant(slots=same_slots),
            "average": variant(fan=fanout)}
    times = {n: [] for n in runs}
    for run in runs.values():
        run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{S} tokens, d={d}, ffn={args.ffn}, {E} experts top-{args.topk}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds")
    for name, t in med.items():
        print(f"{name:<8} {1e3 * t:8.2f} ms  {t / med['plain']:.2f}x plain")


if __name__ == "__main__":
    main()
