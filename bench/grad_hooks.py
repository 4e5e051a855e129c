"""What the frozen-gradient hooks cost (desmoe/engine.py ``_frozen_groups_give_no_gradient``): one Python
tensor hook on every trainable parameter, run at every backward, returning the gradient unchanged unless the
parameter's optimizer group is frozen.  Times the same forward + backward over ``--params`` small parameters
without and with the hooks (nothing frozen: the common case), alternating rounds, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grad_hooks.py [--params 3000] [--rounds 15]

The per-parameter figure times a model's parameter count is what a micro-step pays (e.g. 5,000 parameter
tensors: DeepSeek-V2-Lite's per-expert weights at EP = 1)."""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from desmoe.engine import _frozen_groups_give_no_gradient  # noqa: E402
from desmoe.moe.trainability import FreezableAdamW  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.params < 1 or args.rounds < 2:
        parser.error("--params must be >= 1 and --rounds >= 2")
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    plain = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(args.params)]
    hooked = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    _frozen_groups_give_no_gradient(FreezableAdamW([{"params": [p]} for p in hooked], lr=0.1))

    def step(params) -> float:
        t0 = time.perf_counter()
        sum((x @ p).sum() for p in params).backward()
        return time.perf_counter() - t0

    for params in (plain, hooked):  # warm-up
        step(params)
    without, with_ = [], []
    for _ in range(args.rounds):
        without.append(step(plain))
        with_.append(step(hooked))
    per = [(b - a) / args.params * 1e6 for a, b in zip(without, with_)]
    ratio = [b / a for a, b in zip(without, with_)]
    q = statistics.quantiles(per, n=4)
    print(f"{args.params} parameters, forward + backward: {statistics.median(without) * 1e3:.1f} ms without hooks, "
          f"{statistics.median(with_) * 1e3:.1f} ms with; ratio {statistics.median(ratio):.2f}x; "
          f"{statistics.median(per):.2f} us a parameter [{q[0]:.2f}-{q[2]:.2f}]")


if __name__ == "__main__":
    main()
