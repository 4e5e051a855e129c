"""The TRGE continual-learning run: tasks in order, one expert group each.

    for task t:  train group t (+ its gate) only  ->  prototype + identifier from frozen features
                 ->  evaluate every test set  ->  row t of the accuracy matrix  ->  checkpoint
    at the end:  Transfer / Avg / Last (ZSCL), table + CSV + heatmaps in the run dir

Baselines (``method``) run through the same loop; see ``desmoe.trge.baselines``.
Resumable: a checkpoint after every task holds the engine state plus the rows,
prototypes and identifier inputs so far.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from desmoe import checkpoint
from desmoe.config import bad, dump_yaml
from desmoe.errors import TrainingFailure
from desmoe.trge import metrics
from desmoe.trge.backbones import BackboneConfig, load_backbone
from desmoe.trge.baselines import METHODS, PoolUsage
from desmoe.trge.data import DataConfig, load_sequence
from desmoe.trge.evaluate import TextBank, evaluate_task
from desmoe.trge.features import frozen_cnn_table
from desmoe.trge.features import key as feature_key
from desmoe.trge.fusion import fusion_weight
from desmoe.trge.groups import GroupSpec, gate_parts, group_unit, setup_groups, train_only_group
from desmoe.trge.inter_group import InterGroupConfig, one_hot_weights
from desmoe.trge.model import Placement, TRGEModel
from desmoe.trge.task_id import IdentifierConfig, OracleIdentifier, TaskInfo, build_identifier


@dataclass
class TrainConfig:
    steps_per_task: int = 100
    micro_batch: int = 32
    lr: float = 1e-3
    warmup: int = 10
    label_smoothing: float = 0.2
    eval_batch: int = 128
    proto_samples: int = 512  # training images per task for the prototype / identifier
    log_every: int = 10
    seed: int = 42
    save_every: int = 0  # steps between checkpoints inside a task (0 = at task ends and on preemption only)
    # Reuse the frozen CNN's pooled features of each sampled training image (embedded tower only):
    # several times faster, at the price of no random-crop augmentation for the image-side adapters.
    cache_image_features: bool = False
    # Where the frozen CNN features of all images are kept between runs (content-keyed; "" = recompute
    # every run).  A CNN tower's features never change, so every method and ablation shares them.
    feature_cache: str = "cache/trge_features"

    def check(self) -> None:
        for key in ("steps_per_task", "micro_batch", "eval_batch", "proto_samples", "log_every"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1", getattr(self, key))
        if self.save_every < 0:
            raise bad("save_every", "an integer >= 0", self.save_every)


@dataclass
class FusionConfig:
    schedule: str = "progress"  # progress (lambda = t/T) | constant | frozen (no fusion) | adapted
    lam_max: float = 1.0


# Test-time variants, evaluated on the same trained groups; "+" combines them (e.g. oracle+no_fusion).
VARIANT_INTER = {  # atoms that change the inter-group routing config
    "no_inter": lambda c: dataclasses.replace(c, reading="own"),
    "text_image": lambda c: dataclasses.replace(c, text_routing="image"),
    "text_vocabulary": lambda c: dataclasses.replace(c, text_routing="vocabulary"),
    "names_route": lambda c: dataclasses.replace(c, unknown_names="route"),
    "names_unseen": lambda c: dataclasses.replace(c, unknown_names="unseen"),
    "filter_none": lambda c: dataclasses.replace(c, group_filter="none"),
    "filter_novel_set": lambda c: dataclasses.replace(c, group_filter="novel_set"),
    "filter_vocabulary": lambda c: dataclasses.replace(c, group_filter="vocabulary"),
}
VARIANTS = ("no_fusion", "oracle", *VARIANT_INTER)


def variant_inter(variant: str, inter: InterGroupConfig) -> InterGroupConfig:
    for atom in variant.split("+"):
        inter = VARIANT_INTER.get(atom, lambda c: c)(inter)
    return inter


@dataclass
class EvalConfig:
    # Ablations that change only the test-time path, evaluated on the same trained groups
    # after every task: no_inter (own group only), no_fusion (lambda = 0), oracle (true task ids), and the
    # class-name readings text_*, names_*, filter_* (inter_group.py); "+" combines atoms.
    variants: list[str] = field(default_factory=list)

    def check(self) -> None:
        for v in self.variants:
            if not v or any(atom not in VARIANTS for atom in v.split("+")):
                raise bad("variants", "a list of " + ", ".join(VARIANTS) + " or '+'-joined atoms", self.variants)


@dataclass
class RunConfig:
    dir: str = "runs"
    name: str = "trge"
    resume: bool = True
    keep_checkpoints: int = 2  # newest checkpoint tags kept (0 = all); each holds only trainable state

    def check(self) -> None:
        if self.keep_checkpoints < 0:
            raise bad("keep_checkpoints", "an integer >= 0 (0 = keep all)", self.keep_checkpoints)


@dataclass
class TRGEExperiment:
    method: str = "trge"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    groups: GroupSpec = field(default_factory=GroupSpec)
    placement: Placement = field(default_factory=Placement)
    inter: InterGroupConfig = field(default_factory=InterGroupConfig)
    identifier: IdentifierConfig = field(default_factory=IdentifierConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> None:
        if self.method not in METHODS:
            raise bad("method", "one of " + ", ".join(METHODS), self.method)
        if self.eval.variants and self.method != "trge":
            raise bad("eval.variants", "empty unless method is trge", self.eval.variants)
        from desmoe.trge.fusion import FUSION_SCHEDULES

        if self.fusion.schedule not in FUSION_SCHEDULES:
            raise bad("fusion.schedule", "one of " + ", ".join(FUSION_SCHEDULES), self.fusion.schedule)


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine to zero, restarted for every task (MoE-Adapters)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps_per_task - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def _cached_features(cfg: TRGEExperiment, table, task, steps: int, gen: torch.Generator):
    """(per-step sample indices, frozen pooled CNN features of the task's training images), or None
    when ``train.cache_image_features`` is off or the image tower is not a CNN (``table`` None)."""
    if not cfg.train.cache_image_features or table is None:
        return None
    sels = torch.randint(len(task.train_y), (steps, cfg.train.micro_batch), generator=gen)
    return sels, table[feature_key(task.name, "train")]


def run_trge(cfg: TRGEExperiment, ds_config_path: str) -> dict:
    import deepspeed.comm as dist

    from desmoe.collectives import all_reduce_
    from desmoe.distributed import init_distributed, is_rank0, prepare_in_turn
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.monitor import Monitor, truncate_metrics
    from desmoe.training.preemption import Preemption, exit_for_requeue
    from desmoe.moe.layer import moe_blocks
    from desmoe.vision.transforms import random_resized_crop

    ds_raw = read_ds_config(ds_config_path)  # user errors first, before any process group exists
    init_distributed()
    # the first use builds the image data and fetches the towers: one rank at a time, never racing
    tasks, controls = prepare_in_turn(lambda: load_sequence(cfg.data))
    if cfg.groups.num_tasks == 0:
        cfg.groups.num_tasks = len(tasks)
    if cfg.groups.num_tasks < len(tasks):
        raise bad("groups.num_tasks", f">= the {len(tasks)} tasks of the sequence (or 0)", cfg.groups.num_tasks)
    if cfg.method == "shared_pool":
        cfg.groups.layout = "pool"
    skipped = {t.name: t.meta.get("skipped", 0) for t in tasks + controls if t.meta.get("skipped", 0)}
    if skipped:
        print("desmoe: warning: images that failed to decode were skipped: "
              + ", ".join(f"{k} {v}" for k, v in skipped.items()), flush=True)
    backbone = prepare_in_turn(lambda: load_backbone(cfg.backbone))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # the gates' training noise: reproducible runs
    if world % cfg.groups.ep_size or cfg.groups.num_experts % cfg.groups.ep_size:
        raise bad("groups.ep_size", f"a divisor of the world size {world} and of the "
                                    f"{cfg.groups.num_experts} experts per site", cfg.groups.ep_size)
    T = cfg.groups.num_tasks
    model = TRGEModel(backbone.model, cfg.groups, cfg.placement)
    setup_groups(model, cfg.train.seed)
    identifier = build_identifier(cfg.identifier, embed_text=lambda texts: model.text_features(*backbone.tokenize(texts)))
    oracle = OracleIdentifier() if any("oracle" in v.split("+") for v in cfg.eval.variants) else None
    ds = resolve_ds_config(ds_raw, cfg.train.micro_batch, lr=cfg.train.lr)
    # trge / continual_ft freeze whole task groups: one optimizer group per task (not per expert);
    # shared_pool freezes single experts, so keeps one group each
    unit = None if cfg.method == "shared_pool" else group_unit(model)
    engine, trainability = build_engine(model, ds, parts=gate_parts(T), expert_unit=unit)
    blocks = moe_blocks(model)
    usage = PoolUsage(blocks, cfg.groups.pool_freeze_per_task) if cfg.method == "shared_pool" else None

    run_dir = Path(cfg.run.dir) / cfg.run.name
    ckpt_dir = run_dir / "checkpoints"
    if cfg.run.resume:
        checkpoint.check_resume_config(run_dir, ckpt_dir, cfg)
    state = checkpoint.load(engine, ckpt_dir, trainable_only=True) if cfg.run.resume else None
    progress = state["progress"] if state else {"rows": [], "control_rows": [], "id_rows": [], "gw_rows": [],
                                                "infos": [], "pool_frozen": [], "seconds": [],
                                                "variants": {v: [] for v in cfg.eval.variants}}
    for info in progress["infos"]:  # identifier and prototypes from the stored frozen features
        stored = TaskInfo(info["name"], info["classnames"], torch.tensor(info["feats"]),
                          description=info.get("description"))
        identifier.fit_task(stored)
        if oracle is not None:
            oracle.fit_task(stored)
    if usage is not None and progress["pool_frozen"]:
        usage.frozen = [set(f) for f in progress["pool_frozen"]]
    for v in cfg.eval.variants:  # a resumed run may ask for a variant the checkpoint did not track
        progress["variants"].setdefault(v, [])
    start = len(progress["rows"])
    steps = cfg.train.steps_per_task if cfg.method != "zero_shot" else 0
    # a checkpoint taken inside task ``start`` (preemption or save_every): continue from its step
    mid = state.get("mid_task") if state else None
    first_step = mid["step"] if mid and mid["task"] == start else 0
    if mid and usage is not None and mid["task"] == start:
        usage.counts = [torch.tensor(c) for c in mid["pool_counts"]]
    done_steps = start * max(steps, 1) + first_step
    if is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
        truncate_metrics(run_dir, after_step=done_steps)  # rows logged after the checkpoint get redone
    monitor = Monitor(run_dir, len(tasks) * max(steps, 1), initial_step=done_steps,
                      desc=f"{cfg.method} {cfg.run.name}")
    t_feat = time.perf_counter()
    table = frozen_cnn_table(model, backbone, tasks + controls, cfg.train.eval_batch, cfg.train.feature_cache,
                             rank, world)
    progress.setdefault("timing", {"startup_features": 0.0, "tasks": []})
    progress["timing"]["startup_features"] += time.perf_counter() - t_feat
    bank = TextBank(model, backbone.tokenize, T, table)
    preemption = Preemption()  # honoured at the next step (or task end), right after a checkpoint
    try:
        for t in range(start, len(tasks)):
            task = tasks[t]
            t0 = time.perf_counter()
            timing = {}
            group = 0 if cfg.method == "continual_ft" else t
            model.train()
            if steps:
                _set_trainable(cfg, trainability, model, group, usage)
                ids, mask = backbone.tokenize(task.prompts())
                w_img = one_hot_weights(group, cfg.train.micro_batch, T)
                w_txt = one_hot_weights(group, len(ids), T)
                gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + 17 * t + rank)
                cached = _cached_features(cfg, table, task, steps, gen)
                for step in range(first_step if t == start else 0, steps):
                    for g in trainability.optimizer.param_groups:
                        g["lr"] = _lr(cfg.train, step)
                    if cached is not None:  # frozen CNN features of this step's images, computed once
                        sel = cached[0][step]
                        cnn = cached[1][sel]
                        logits = engine(None, ids, mask, w_img, w_txt, cnn_features=cnn)
                    else:
                        g = torch.Generator().manual_seed(cfg.train.seed * 10**6 + 1009 * t + 17 * step + rank)
                        sel = torch.randint(len(task.train_y), (cfg.train.micro_batch,), generator=g)
                        px = backbone.pixels(random_resized_crop(task.train_x[sel], g))
                        logits = engine(px, ids, mask, w_img, w_txt)
                    loss = F.cross_entropy(logits, task.train_y[sel], label_smoothing=cfg.train.label_smoothing)
                    if not torch.isfinite(loss):
                        raise TrainingFailure(f"non-finite loss at task {task.name} step {step + 1}; lower train.lr")
                    engine.backward(loss)
                    engine.step()
                    if usage is not None:
                        usage.record()
                    done = t * steps + step + 1
                    monitor.progress(1, loss=loss.item())
                    if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps:
                        monitor.scalars(done, {"train/loss": loss.item(), "train/lr": _lr(cfg.train, step)})
                    if step + 1 < steps:
                        every = cfg.train.save_every and (step + 1) % cfg.train.save_every == 0
                        stop = preemption.requested()
                        if every or stop:
                            mid_state = {"task": t, "step": step + 1,
                                         "pool_counts": [c.tolist() for c in usage.counts] if usage else []}
                            checkpoint.save(engine, ckpt_dir, done, client_state={"progress": progress,
                                                                                  "mid_task": mid_state},
                                            trainable_only=True, keep=cfg.run.keep_checkpoints)
                        if stop:
                            exit_for_requeue(monitor, preemption, done, f"at step {step + 1} of task {t + 1}")
                if usage is not None:
                    usage.freeze_most_used(reduce=all_reduce_)
            model.eval()
            timing["train"] = time.perf_counter() - t0
            # Task t is done: its prototype and identifier inputs from frozen features.
            with torch.no_grad():
                pick = torch.randperm(len(task.train_y), generator=torch.Generator().manual_seed(t))
                pick = pick[: cfg.train.proto_samples]
                if table is not None:
                    feats = model.image_features(None, cnn_features=table[feature_key(task.name, "train")][pick])
                else:
                    feats = torch.cat([model.image_features(backbone.pixels(task.train_x[pick[i:i + 128]]))
                                       for i in range(0, len(pick), 128)])
            info = TaskInfo(task.name, task.classnames, feats, images=task.train_x[pick[:8]].numpy(),
                            description=task.meta.get("description") if cfg.identifier.backend != "mllm" else None)
            identifier.fit_task(info)
            if oracle is not None:
                oracle.fit_task(info)
            protos = F.normalize(torch.stack([F.normalize(i.feats.float().mean(0), dim=0)
                                              for i in identifier_infos(identifier)]), dim=-1)
            lam = fusion_weight(cfg.fusion.schedule, t + 1, len(tasks), cfg.fusion.lam_max)
            row, id_row, gw_row, ctrl_row = [], [], [], []
            timing["prototype"] = time.perf_counter() - t0 - timing["train"]
            trained_names = [set(x.classnames) for x in tasks[:t + 1]]
            if cfg.method == "continual_ft":  # one group trained on every learned class name
                trained_names = [set().union(*trained_names)]
            for j, other in enumerate(tasks + controls):
                truth = j if j <= t else -1
                r = evaluate_task(cfg.method, model, bank, backbone.pixels, other, truth, t + 1, identifier,
                                  protos, cfg.inter, lam, cfg.train.eval_batch, rank, world,
                                  need_images=cfg.identifier.backend == "mllm", trained_names=trained_names)
                (row if j < len(tasks) else ctrl_row).append(r["acc"])
                id_row.append(r["id_acc"])
                gw_row.append(r["group_weights"])
            timing["eval"] = time.perf_counter() - t0 - timing["train"] - timing["prototype"]
            for v in cfg.eval.variants:  # same groups, another test-time path
                atoms = v.split("+")
                ident = oracle if "oracle" in atoms else identifier
                progress["variants"][v].append([
                    evaluate_task("trge", model, bank, backbone.pixels, other, j if j <= t else -1, t + 1, ident,
                                  protos, variant_inter(v, cfg.inter), 0.0 if "no_fusion" in atoms else lam,
                                  cfg.train.eval_batch, rank,
                                  world, trained_names=trained_names)["acc"] for j, other in enumerate(tasks)])
            progress["rows"].append(row)
            progress["control_rows"].append(ctrl_row)
            progress["id_rows"].append(id_row)
            progress["gw_rows"].append(gw_row)
            progress["infos"].append({"name": info.name, "classnames": info.class_names, "feats": feats.tolist(),
                                      "description": info.description})
            progress["pool_frozen"] = [sorted(f) for f in usage.frozen] if usage is not None else []
            progress["seconds"].append(time.perf_counter() - t0)
            timing["variants"] = progress["seconds"][-1] - timing["train"] - timing["prototype"] - timing["eval"]
            progress["timing"]["tasks"].append(timing)
            _log_stage(monitor, cfg, tasks, controls, progress, t, steps)
            checkpoint.save(engine, ckpt_dir, (t + 1) * max(steps, 1), client_state={"progress": progress},
                            trainable_only=True, keep=cfg.run.keep_checkpoints)
            if t + 1 < len(tasks) and preemption.requested():
                exit_for_requeue(monitor, preemption, (t + 1) * max(steps, 1), f"after task {t + 1}")
    finally:
        monitor.close()
    summary = summarize(cfg, tasks, controls, progress, model)
    if is_rank0():
        write_reports(run_dir, summary, tasks, controls, progress)
    return summary


def identifier_infos(identifier) -> list[TaskInfo]:
    return getattr(identifier, "inner", identifier).tasks


def _set_trainable(cfg, trainability, model, group, usage) -> None:
    if usage is None:
        train_only_group(trainability, model, group)
        return
    usage.apply(trainability)
    for part in trainability.parts:
        if part.startswith("gate"):
            trainability.set_part(part, part == f"gate{group}")


def _log_stage(monitor, cfg, tasks, controls, progress, t, steps) -> None:
    step = (t + 1) * max(steps, 1)
    names = [x.name for x in tasks + controls]
    row = progress["rows"][-1] + progress["control_rows"][-1]
    monitor.scalars(step, {f"acc/{n}": a for n, a in zip(names, row)})
    if cfg.method in ("trge", "shared_pool"):
        monitor.scalars(step, {f"id_acc/{n}": a for n, a in zip(names, progress["id_rows"][-1])})
    matrix = np.full((len(tasks), len(tasks)), np.nan)
    for i, r in enumerate(progress["rows"]):
        matrix[i] = r
    monitor.heatmap(step, "accuracy_matrix", np.nan_to_num(matrix), xlabel="test set", ylabel="after task")
    gw = np.array(progress["gw_rows"][-1])
    monitor.heatmap(step, "group_weights", gw, xlabel="group", ylabel="test set")


def trainable_per_task(cfg, model, progress) -> int:
    from desmoe.moe.layer import moe_blocks

    if cfg.method == "zero_shot":
        return 0
    if cfg.method != "shared_pool":
        return model.trainable_parameters()
    total = 0
    for b, block in enumerate(moe_blocks(model)):
        per_expert = sum(p.numel() for p in block.local_experts[0].parameters())
        frozen_before_last = len(progress["pool_frozen"][b]) - cfg.groups.pool_freeze_per_task if progress["pool_frozen"] else 0
        total += (block.num_experts - max(frozen_before_last, 0)) * per_expert
        total += sum(p.numel() for p in block.router.gates[0].parameters())
    return total


def summarize(cfg, tasks, controls, progress, model) -> dict:
    A = np.array(progress["rows"], dtype=np.float64)
    out = {"method": cfg.method, "tasks": [t.name for t in tasks], "controls": [c.name for c in controls],
           "accuracy_matrix": progress["rows"], "control_rows": progress["control_rows"],
           "id_rows": progress["id_rows"], "seconds_per_task": progress["seconds"],
           "timing": progress.get("timing", {}),
           "trainable_params_per_task": trainable_per_task(cfg, model, progress),
           "identifier": cfg.identifier.backend + ("+batch-vote" if cfg.identifier.per_batch else ""),
           "reading": cfg.inter.reading, "fusion": cfg.fusion.schedule,
           # images that failed to decode while loading (skipped, not fatal)
           "skipped_images": {t.name: int(t.meta.get("skipped", 0)) for t in tasks + controls}}
    if A.shape[0] == A.shape[1] and A.shape[0] >= 2:
        out.update(metrics.mtil_metrics(A))
        out["variants"] = {v: {"accuracy_matrix": rows, **metrics.mtil_metrics(np.array(rows))}
                           for v, rows in progress.get("variants", {}).items() if len(rows) == A.shape[0]}
    return out


def write_reports(run_dir: Path, summary: dict, tasks, controls, progress) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.name for t in tasks]
    A = np.array(progress["rows"])
    lines = ["after_task," + ",".join(names + [c.name for c in controls])]
    for i, r in enumerate(progress["rows"]):
        lines.append(names[i] + "," + ",".join(f"{v:.2f}" for v in r + progress["control_rows"][i]))
    checkpoint.write_text_atomic(run_dir / "accuracy_matrix.csv", "\n".join(lines) + "\n")
    checkpoint.write_text_atomic(run_dir / "results.json", json.dumps(summary, indent=1))
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.5 * len(names)))
    ax.imshow(A, vmin=0, vmax=100, cmap="viridis")
    for i in range(A.shape[0]):
        for j in range(A.shape[1]):
            ax.text(j, i, f"{A[i, j]:.0f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(A.shape[0]), names[:A.shape[0]], fontsize=7)
    ax.set_title(f"{summary['method']}: accuracy after each task")
    fig.tight_layout()
    tmp = run_dir / ".accuracy_matrix.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(run_dir / "accuracy_matrix.png")
