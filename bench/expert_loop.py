"""The MoE block's training step with the CPU experts as they are now against an earlier revision's: the
experts' loop in Python over ``torch.mm`` with that revision's C kernels (``swiglu.c``, ``rows.c``, built
here from ``git show``), the same block, weights, routing and input, in one process.

Per round both variants run once, in alternating order, each after a write of 256 MiB (no inherited warm
caches); the clock is the thread's CPU time (one thread).  Prints the medians and the per-round ratio
earlier / now, median [quartiles].  Revisions whose kernels have the same C entry points as today's only
(the SwiGLU fwd / in-place bwd and the row passes: 6a1d3fe, session 13's last code, is one).

    OMP_NUM_THREADS=1 python bench/expert_loop.py [--shape toy] [--rounds 30] [--before 6a1d3fe]
    OMP_NUM_THREADS=1 python bench/expert_loop.py --model embedded [--seq 256 --batch 4]

``--model``: a whole model's training step instead of one block (forward, backward and AdamW;
``bench/model_mfu.py``'s models, e.g. ``embedded``, the demo's base shape, randomly initialised).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import desmoe.kernels as kernels  # noqa: E402


def kernels_at(rev: str, into: Path) -> kernels.SwiGLUKernels:
    """``rev``'s swiglu.c and rows.c compiled as desmoe.kernels compiles today's (one library)."""
    objects = []
    for name in ("bf16.h", "swiglu.c", "rows.c"):
        src = subprocess.run(["git", "show", f"{rev}:desmoe/kernels/{name}"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        (into / name).write_text(src)
    for name in ("swiglu.c", "rows.c"):
        obj = into / (name + ".o")
        subprocess.run(["gcc", *kernels._cflags(), "-fPIC", "-c", str(into / name), "-o", str(obj)], check=True)
        objects.append(str(obj))
    lib = into / f"libkernels_{rev}.so"
    subprocess.run(["gcc", "-shared", *objects, "-o", str(lib), "-lmvec", "-lm"], check=True)
    return kernels.SwiGLUKernels(lib)


def model_step(name: str, seq: int, batch: int, cache: Path):
    """One training step of bench/model_mfu.py's model ``name`` (fp32, CPU): forward, backward, AdamW."""
    import model_mfu

    model, _, vocab = model_mfu.build(name, cache, torch.float32, torch.device("cpu"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="toy")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--before", default="6a1d3fe", help="the earlier revision (its kernels, the Python loop)")
    p.add_argument("--model", default=None, help="a bench/model_mfu.py model: time its training step instead")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    if args.rounds < 2:  # the quartiles of the per-round ratios need two (a traceback in statistics otherwise)
        p.error(f"--rounds {args.rounds}: expected at least 2")
    import moe_block
    from block_variants import step_fn

    from desmoe.distributed import init_distributed

    init_distributed()
    torch.set_num_threads(1)
    if args.model:
        run = model_step(args.model, args.seq, args.batch, Path(tempfile.gettempdir()) / "desmoe-mfu")
        args.shape = f"{args.model}, batch {args.batch} x seq {args.seq}"
    else:
        s = moe_block.resolve(moe_block.parse(["--shape", args.shape]), False)
        block = moe_block.build(s, torch.device("cpu"), torch.float32)["desmoe"]
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(s["tokens"], s["hidden"], generator=gen)
        grad = torch.randn(s["tokens"], s["hidden"], generator=gen)
        run = step_fn(block, x, grad)
    with tempfile.TemporaryDirectory() as tmp:
        before = kernels_at(args.before, Path(tmp))
        variants = {"now": (kernels.swiglu_cpu(), kernels.rows_cpu(), "1"),
                    args.before: (before, kernels.RowKernels(before.lib), "0")}

        def use(name):
            kernels._lib, kernels._rows, os.environ["DESMOE_EXPERT_LOOP"] = variants[name]
        for name in variants:  # warm-up
            use(name)
            run()
        scrub = torch.empty(256 << 20, dtype=torch.uint8)
        times = {name: [] for name in variants}
        for r in range(args.rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                use(name)
                scrub.fill_(r)
                t0 = time.thread_time()
                run()
                times[name].append(time.thread_time() - t0)
    ratios = [b / a for a, b in zip(times["now"], times[args.before])]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    now, before = (1e3 * statistics.median(times[n]) for n in ("now", args.before))
    print(f"{args.shape}, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}: now {now:.2f} ms, {args.before} "
          f"{before:.2f} ms; {args.before} / now per round {q2:.3f} [{q1:.3f}-{q3:.3f}]")


if __name__ == "__main__":
    main()
