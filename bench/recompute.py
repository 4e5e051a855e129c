"""Activation checkpointing (``train.activation_checkpointing``): peak step memory and step time with
``layers`` against ``none``, at the embedded base's shape (bench/model_mfu.py's ``embedded``: the HF model
desmoe trains, DeepSeek-V2 layout, d 256, 4 layers, 16 experts top-2 + shared), one process, no ZeRO.

    python bench/recompute.py [--seq 1024 --batch 2 --rounds 6]
    python bench/recompute.py --model trge [--batch 8 --prompts 10 --rounds 6]

``--model trge``: TRGE's expert groups (11 tasks x 2 adapter experts, bottleneck 64, as MTIL) in every
block of both towers of a CLIP ViT-B/16-shaped model (random weights, frozen; 224 px images, 12-token
class prompts); the step is TRGE's: logits of ``--batch`` images against ``--prompts`` prompts, one
group trained (AdamW over the groups' parameters only).

Step = forward + backward + AdamW, fp32 on CPU (bf16 on CUDA).
* memory: each mode in a fresh child process, after two warm-up steps (Adam's moments exist), one step,
  counted in bytes malloc has handed out (glibc ``mallinfo2``; torch's CPU tensors live there, and unlike
  the resident size it does not include freed memory glibc keeps): "held for backward" = at the end of
  the forward above before it (what recompute is for); "step peak" = the step's maximum above before it,
  sampled every ~0.2 ms by a thread.  On CUDA both from ``memory_allocated`` / ``max_memory_allocated``.
* time: both models (same weights) in one child, steps alternating, median of per-round ratios.
The parent prints the figures and the ratios layers / none.
"""
from __future__ import annotations

import argparse
import json
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


def parse(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("embedded", "trge"), default="embedded")
    p.add_argument("--prompts", type=int, default=10, help="trge: class prompts a step embeds")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="timed steps of each mode")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as each of 2 ranks on 2 cores)")
    p.add_argument("--child", choices=("memory", "time"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _setup(mode: str, args):
    import torch

    from desmoe.recompute import apply
    from model_mfu import build

    torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.model == "trge":
        return _trge_step(mode, args, device), cuda
    cache = Path(os.environ.get("DESMOE_MFU_CACHE", str(Path(tempfile.gettempdir()) / "desmoe-mfu")))  # as model_mfu.py
    model, _, vocab = build("embedded", cache, torch.bfloat16 if cuda else torch.float32, device)
    apply(model.train(), mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step(probe=None):
        loss = model(input_ids=ids, labels=ids).loss
        if probe is not None:
            probe()  # the end of the forward: what backward needs is held now
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    return step, cuda


def _trge_step(mode: str, args, device):
    """TRGE's training step on a CLIP ViT-B/16-shaped model with expert groups (module doc)."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPModel

    from desmoe.recipes.trge.groups import GroupSpec, setup_groups
    from desmoe.recipes.trge.inter_group import one_hot_weights
    from desmoe.recipes.trge.model import Placement, TRGEModel
    from desmoe.recompute import apply

    vocab = 49408  # CLIP's BPE; the last two ids are its BOS and EOS
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16), projection_dim=512)
    torch.manual_seed(0)
    spec = GroupSpec(num_tasks=11, experts_per_group=2, top_k=2, bottleneck=64)
    model = TRGEModel(CLIPModel(config), spec, Placement())
    setup_groups(model, seed=0)
    apply(model.to(device).train(), mode)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(args.batch, 3, 224, 224, generator=g).to(device)
    ids = torch.randint(vocab - 2, (args.prompts, 12), generator=g)
    ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1
    ids, mask = ids.to(device), torch.ones_like(ids).to(device)
    y = torch.randint(args.prompts, (args.batch,), generator=g).to(device)
    w_img, w_txt = one_hot_weights(3, args.batch, 11), one_hot_weights(3, args.prompts, 11)

    def step(probe=None):
        loss = F.cross_entropy(model(px, ids, mask, w_img, w_txt), y)
        if probe is not None:
            probe()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


class _MallInfo2(__import__("ctypes").Structure):
    _fields_ = [(name, __import__("ctypes").c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_mallinfo2 = None


def _allocated() -> int:
    """Bytes malloc has handed out and not had back (heap + mmapped chunks): torch's CPU tensors live here."""
    global _mallinfo2
    if _mallinfo2 is None:
        import ctypes

        _mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        _mallinfo2.restype = _MallInfo2
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


def child_memory(args) -> dict:
    import torch

    step, cuda = _setup(args.mode, args)
    step(), step()
    held = {}
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(lambda: held.setdefault("b", torch.cuda.memory_allocated() - base))
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "rest_bytes": base, "held_bytes": held["b"]}
    import threading

    base = _allocated()
    peak, done = [base], threading.Event()

    def sample():  # torch's kernels release the GIL: a sample about every 0.2 ms
        while not done.wait(0.0002):
            peak[0] = max(peak[0], _allocated())
    sampler = threading.Thread(target=sample)
    sampler.start()
    step(lambda: held.setdefault("b", _allocated() - base))
    done.set()
    sampler.join()
    return {"peak_bytes": peak[0] - base, "rest_bytes": base, "held_bytes": held["b"]}


def child_time(args) -> dict:
    steps = {mode: _setup(mode, args)[0] for mode in ("none", "layers")}
    for s in steps.values():
        s(), s()
    times = {mode: [] for mode in steps}
    for r in range(args.rounds):
        for mode in (("none", "layers") if r % 2 == 0 else ("layers", "none")):  # alternate the order
            t0 = time.perf_counter()
            steps[mode]()
            times[mode].append(time.perf_counter() - t0)
    return times


def run_child(kind: str, args, mode: str = "none") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--child", kind, "--mode", mode, "--model", args.model,
           "--prompts", str(args.prompts), "--seq", str(args.seq),
           "--batch", str(args.batch), "--rounds", str(args.rounds), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"bench child {kind}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        print(json.dumps(child_memory(args) if args.child == "memory" else child_time(args)))
        return
    mem = {mode: run_child("memory", args, mode) for mode in ("none", "layers")}
    times = run_child("time", args)
    med = {m: statistics.median(t) for m, t in times.items()}
    ratios = sorted(b / a for a, b in zip(times["none"], times["layers"]))
    mib = lambda b: b / 2**20  # noqa: E731
    shape = (f"TRGE on CLIP ViT-B/16 shape, {args.batch} images x {args.prompts} prompts" if args.model == "trge"
             else f"embedded base shape, batch {args.batch} x seq {args.seq}")
    print(f"{shape}, forward + backward + AdamW, "
          f"{args.rounds} alternating rounds, {args.threads} thread(s)")
    for m in ("none", "layers"):
        print(f"  {m:6s}  held for backward {mib(mem[m]['held_bytes']):8.1f} MiB   step peak above rest "
              f"{mib(mem[m]['peak_bytes']):8.1f} MiB (rest {mib(mem[m]['rest_bytes']):7.1f} MiB)   "
              f"step {med[m] * 1e3:8.1f} ms (median)")
    ratio = lambda key: mem["layers"][key] / mem["none"][key]  # noqa: E731
    print(f"  layers / none: held for backward {ratio('held_bytes'):.2f}x, step peak {ratio('peak_bytes'):.2f}x, "
          f"step time {statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]")


if __name__ == "__main__":
    main()
