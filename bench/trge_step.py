"""TRGE training-step cost at the first vs the last task, and with one optimizer
group per expert vs one per task group (same process, interleaved).

    python bench/trge_step.py [--tasks 10] [--layers 2] [--steps 8] [--backbone tiny_clip|tiny_dual|towers]
    torchrun --nproc_per_node 2 bench/trge_step.py --ep 2 ...   # as the TRGE runs: 2 ranks, experts parallel

Training task t routes every sample to group t only and freezes every other
group, so the step should cost the same at task 0 and at task T-1 (all groups
are pre-allocated; only the trainable set changes).  Two DeepSpeed engines
(ZeRO-2, FreezableAdamW) on identical models differ only in their optimizer
groups: per (block, expert) -- the core's default -- or per task group (what
TRGE uses, ``groups.group_unit``).  Prints the median step time (and its
``engine.step()`` part) of each, their ratios, plus the evaluation forward with
1 vs 2 groups mixed per sample.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per block")
    ap.add_argument("--blocks", type=int, default=3, help="interleaved blocks per task")
    ap.add_argument("--backbone", default="tiny_clip")
    ap.add_argument("--layers", type=int, default=2, help="encoder layers per tower (one MoE site each)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bottleneck", type=int, default=16, help="adapter width (configs/trge_offline.yaml: 64)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (launch that many ranks or more)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    import deepspeed.comm as dist

    from desmoe.distributed import init_distributed
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.data import digit_sequence
    from desmoe.recipes.trge.groups import GroupSpec, gate_parts, group_unit, setup_groups, train_only_group
    from desmoe.recipes.trge.inter_group import one_hot_weights
    from desmoe.recipes.trge.model import Placement, TRGEModel

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    init_distributed()
    T = args.tasks
    ds = resolve_ds_config(read_ds_config("configs/zero2.json"), args.batch, lr=1e-3)
    runs = {}
    for mode in ("per expert", "per task group"):
        bb = load_backbone(BackboneConfig(kind=args.backbone, hidden_size=64, layers=args.layers, image_size=32))
        model = TRGEModel(bb.model, GroupSpec(num_tasks=T, experts_per_group=2, top_k=2, bottleneck=args.bottleneck,
                                                   ep_size=args.ep), Placement())
        setup_groups(model, 0)
        unit = group_unit(model) if mode == "per task group" else None
        engine, trainability = build_engine(model, ds, parts=gate_parts(T), expert_unit=unit)
        runs[mode] = (model, engine, trainability)
    tasks, _ = digit_sequence(n_train=256, n_test=64)
    task = tasks[0]
    ids, mask = bb.tokenize(task.prompts())
    gen = torch.Generator().manual_seed(0)

    def step(mode: str, t: int) -> tuple[float, float]:
        engine = runs[mode][1]
        sel = torch.randint(len(task.train_y), (args.batch,), generator=gen)
        px = bb.pixels(task.train_x[sel])
        t0 = time.perf_counter()
        logits = engine(px, ids, mask, one_hot_weights(t, args.batch, T), one_hot_weights(t, len(ids), T))
        loss = F.cross_entropy(logits, task.train_y[sel])
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    times = {(mode, t): [] for mode in runs for t in (0, T - 1)}
    for mode, t in times:  # warm-up all
        train_only_group(runs[mode][2], runs[mode][0], t)
        step(mode, t)
        step(mode, t)
    for _ in range(args.blocks):
        for mode, t in times:
            train_only_group(runs[mode][2], runs[mode][0], t)
            times[(mode, t)].extend(step(mode, t) for _ in range(args.steps))

    say = print if dist.get_rank() == 0 else (lambda *a, **k: None)

    def med(mode, t, part=0):
        return statistics.median(x[part] for x in times[(mode, t)])

    from desmoe.moe.layer import moe_blocks

    sites = len(moe_blocks(runs["per expert"][0]))
    say(f"train step, {T} groups of 2 experts at {sites} MoE sites, bottleneck {args.bottleneck}, batch {args.batch}, "
        f"backbone {args.backbone}, ZeRO-2, {dist.get_world_size()} rank(s), EP={args.ep} (rank 0's times):")
    for mode, (_, _, trainability) in runs.items():
        first, last = med(mode, 0), med(mode, T - 1)
        n = len(trainability.optimizer.param_groups)
        say(f"  {mode:>14} ({n:3d} optimizer groups): task 1 {first * 1e3:6.1f} ms "
            f"(step() {med(mode, 0, 1) * 1e3:5.1f})   task {T} {last * 1e3:6.1f} ms "
            f"(step() {med(mode, T - 1, 1) * 1e3:5.1f})   ratio last/first = {last / first:.2f}")
    both = {mode: statistics.median([x[0] for t in (0, T - 1) for x in times[(mode, t)]]) for mode in runs}
    opt = {mode: statistics.median([x[1] for t in (0, T - 1) for x in times[(mode, t)]]) for mode in runs}
    say(f"  per task group / per expert: whole step {both['per task group'] / both['per expert']:.2f}, "
        f"engine.step() {opt['per task group'] / opt['per expert']:.2f}")

    model = runs["per task group"][0]
    model.eval()
    px = bb.pixels(task.test_x[:64])
    one = one_hot_weights(0, 64, T)
    two = torch.zeros(64, T)
    two[:, 0], two[:, T - 1] = 0.6, 0.4
    ev = {"1 group": [], "2 groups": []}
    with torch.no_grad():
        for _ in range(2 * args.blocks):
            for name, w in (("1 group", one), ("2 groups", two)):
                t0 = time.perf_counter()
                model.image_features(px, w)
                ev[name].append(time.perf_counter() - t0)
    e1, e2 = statistics.median(ev["1 group"]), statistics.median(ev["2 groups"])
    say(f"eval image forward (64 images): 1 group {e1 * 1e3:.1f} ms, 2 groups mixed {e2 * 1e3:.1f} ms, "
        f"ratio {e2 / e1:.2f}")


if __name__ == "__main__":
    main()
