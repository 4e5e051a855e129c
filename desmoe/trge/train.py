"""The TRGE continual-learning recipe: tasks in order (one trainer stage each), one expert group each.

    for task t:  train group t (+ its gate) only  ->  prototype + identifier from frozen features
                 ->  evaluate every test set  ->  row t of the accuracy matrix  ->  checkpoint
    at the end:  Transfer / Avg / Last (ZSCL), table + CSV + heatmaps in the run dir

Baselines (``method``) are classes of ``desmoe.trge.baselines`` on the same recipe.
Resumable: a checkpoint after every task holds the engine state plus the rows,
prototypes and identifier inputs so far (and, inside a task, the step).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from desmoe import checkpoint
from desmoe.config import bad
from desmoe.trge import metrics
from desmoe.trge.backbones import load_backbone
from desmoe.trge.baselines import build_method
from desmoe.trge.config import TrainConfig, TRGEExperiment, variant_inter  # noqa: F401  (TRGEExperiment: users)
from desmoe.trge.data import load_sequence
from desmoe.trge.evaluate import TextBank, evaluate_task
from desmoe.trge.features import frozen_cnn_table
from desmoe.trge.features import key as feature_key
from desmoe.trge.fusion import fusion_weight
from desmoe.trge.groups import gate_parts, setup_groups
from desmoe.trge.inter_group import one_hot_weights
from desmoe.trge.model import TRGEModel
from desmoe.trge.task_id import OracleIdentifier, TaskInfo, build_identifier
from desmoe.training.trainer import Cadence, Recipe, Setup, Trainer


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


class TRGERecipe(Recipe):
    """One stage per task: train the task's group, then prototype, identifier and the evaluation of
    every test set (a row of the accuracy matrix) at the stage end."""

    trainable_only = True  # the frozen backbone is rebuilt by every run
    logs_expert_load = False
    throughput = "samples"

    def __init__(self, cfg: TRGEExperiment) -> None:
        super().__init__(cfg)
        self.name = cfg.method

    def setup(self, trainer: Trainer) -> Setup:
        from desmoe.distributed import prepare_in_turn

        cfg = self.cfg
        # the first use builds the image data and fetches the towers: one rank at a time, never racing
        self.tasks, self.controls = prepare_in_turn(lambda: load_sequence(cfg.data))
        if cfg.groups.num_tasks == 0:
            cfg.groups.num_tasks = len(self.tasks)
        if cfg.groups.num_tasks < len(self.tasks):
            raise bad("groups.num_tasks", f">= the {len(self.tasks)} tasks of the sequence (or 0)", cfg.groups.num_tasks)
        if cfg.method == "shared_pool":
            cfg.groups.layout = "pool"
        skipped = {t.name: t.meta.get("skipped", 0) for t in self.tasks + self.controls if t.meta.get("skipped", 0)}
        if skipped:
            print("desmoe: warning: images that failed to decode were skipped: "
                  + ", ".join(f"{k} {v}" for k, v in skipped.items()), flush=True)
        self.backbone = prepare_in_turn(lambda: load_backbone(cfg.backbone))
        torch.manual_seed(cfg.train.seed * 1000 + trainer.rank)  # the gates' training noise: reproducible runs
        if trainer.world % cfg.groups.ep_size or cfg.groups.num_experts % cfg.groups.ep_size:
            raise bad("groups.ep_size", f"a divisor of the world size {trainer.world} and of the "
                                        f"{cfg.groups.num_experts} experts per site", cfg.groups.ep_size)
        T = cfg.groups.num_tasks
        self.model = model = TRGEModel(self.backbone.model, cfg.groups, cfg.placement)
        setup_groups(model, cfg.train.seed)
        self.identifier = build_identifier(cfg.identifier, embed_text=lambda texts: model.text_features(
            *self.backbone.tokenize(texts)))
        self.oracle = OracleIdentifier() if any("oracle" in v.split("+") for v in cfg.eval.variants) else None
        self.baseline = build_method(cfg, model)
        return Setup(model, cfg.train.micro_batch, lr=cfg.train.lr, parts=gate_parts(T),
                     expert_unit=self.baseline.expert_unit(model))

    def attach(self, trainer, state):
        cfg, progress = self.cfg, state["progress"] if state else {
            "rows": [], "control_rows": [], "id_rows": [], "gw_rows": [], "infos": [], "pool_frozen": [],
            "seconds": [], "variants": {v: [] for v in self.cfg.eval.variants}}
        for info in progress["infos"]:  # identifier and prototypes from the stored frozen features
            stored = TaskInfo(info["name"], info["classnames"], torch.tensor(info["feats"]),
                              description=info.get("description"))
            self.identifier.fit_task(stored)
            if self.oracle is not None:
                self.oracle.fit_task(stored)
        for v in cfg.eval.variants:  # a resumed run may ask for a variant the checkpoint did not track
            progress["variants"].setdefault(v, [])
        self.progress, self.mid = progress, None
        self.baseline.load_state(progress, (state or {}).get("mid_task"), len(progress["rows"]))
        t_feat = time.perf_counter()
        self.table = frozen_cnn_table(self.model, self.backbone, self.tasks + self.controls, cfg.train.eval_batch,
                                      cfg.train.feature_cache, trainer.rank, trainer.world)
        progress.setdefault("timing", {"startup_features": 0.0, "tasks": []})
        progress["timing"]["startup_features"] += time.perf_counter() - t_feat
        self.bank = TextBank(self.model, self.backbone.tokenize, cfg.groups.num_tasks, self.table)

    def cadence(self):
        return Cadence(self.cfg.train.log_every, 0, self.cfg.train.save_every)

    def stages(self):
        return [0 if self.cfg.method == "zero_shot" else self.cfg.train.steps_per_task] * len(self.tasks)

    def tokens_per_step(self):
        return self.cfg.train.micro_batch * self.trainer.world

    def begin_stage(self, t, first_step):
        cfg, T, task = self.cfg, self.cfg.groups.num_tasks, self.tasks[t]
        self.t0, self.timing = time.perf_counter(), {}
        group = 0 if cfg.method == "continual_ft" else t
        self.model.train()
        if not self.stages()[t]:
            return
        self.baseline.set_trainable(self.trainer.trainability, group)
        self.ids, self.mask = self.backbone.tokenize(task.prompts())
        self.w_img = one_hot_weights(group, cfg.train.micro_batch, T)
        self.w_txt = one_hot_weights(group, len(self.ids), T)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + 17 * t + self.trainer.rank)
        self.cached = _cached_features(cfg, self.table, task, self.stages()[t], gen)

    def lr(self, t, step):
        return _lr(self.cfg.train, step)

    def step(self, t, step):
        from desmoe.vision.transforms import random_resized_crop

        cfg, task, engine = self.cfg, self.tasks[t], self.trainer.engine
        if self.cached is not None:  # frozen CNN features of this step's images, computed once
            sel = self.cached[0][step]
            logits = engine(None, self.ids, self.mask, self.w_img, self.w_txt, cnn_features=self.cached[1][sel])
        else:
            g = torch.Generator().manual_seed(cfg.train.seed * 10**6 + 1009 * t + 17 * step + self.trainer.rank)
            sel = torch.randint(len(task.train_y), (cfg.train.micro_batch,), generator=g)
            px = self.backbone.pixels(random_resized_crop(task.train_x[sel], g))
            logits = engine(px, self.ids, self.mask, self.w_img, self.w_txt)
        self.loss = F.cross_entropy(logits, task.train_y[sel], label_smoothing=cfg.train.label_smoothing)
        self.at = (t, step)
        return self.loss, self.loss.item()

    def end_step(self, t, step):
        self.baseline.record()
        self.mid = {"task": t, "step": step + 1, "pool_counts": self.baseline.counts_state()}

    def log(self, done):
        return {"train/loss": self.loss.item(), "train/lr": _lr(self.cfg.train, self.at[1])}

    def state_dict(self):
        return {"progress": self.progress, **({"mid_task": self.mid} if self.mid else {})}

    def end_stage(self, t, done):
        if self.stages()[t]:
            self.baseline.end_task()
        self.mid = None
        self.model.eval()
        self.timing["train"] = time.perf_counter() - self.t0
        evaluate_stage(self, t)
        _log_stage(self.trainer.monitor, self.cfg, self.tasks, self.controls, self.progress, t, done)

    def summary(self, trainer):
        from desmoe.distributed import is_rank0

        summary = summarize(self.cfg, self.tasks, self.controls, self.progress, self.model)
        if is_rank0():
            write_reports(trainer.run_dir, summary, self.tasks, self.controls, self.progress)
        return summary


def run_trge(cfg: TRGEExperiment, ds_config_path: str) -> dict:
    return Trainer(TRGERecipe(cfg), ds_config_path).run()


def evaluate_stage(r: TRGERecipe, t: int) -> None:
    """Task t is done: its prototype and identifier inputs from frozen features, then every test set
    (and each test-time variant) evaluated into the progress rows."""
    cfg, model, task, tasks, progress, timing = r.cfg, r.model, r.tasks[t], r.tasks, r.progress, r.timing
    rank, world = r.trainer.rank, r.trainer.world
    with torch.no_grad():
        pick = torch.randperm(len(task.train_y), generator=torch.Generator().manual_seed(t))
        pick = pick[: cfg.train.proto_samples]
        if r.table is not None:
            feats = model.image_features(None, cnn_features=r.table[feature_key(task.name, "train")][pick])
        else:
            feats = torch.cat([model.image_features(r.backbone.pixels(task.train_x[pick[i:i + 128]]))
                               for i in range(0, len(pick), 128)])
    info = TaskInfo(task.name, task.classnames, feats, images=task.train_x[pick[:8]].numpy(),
                    description=task.meta.get("description") if cfg.identifier.backend != "mllm" else None)
    r.identifier.fit_task(info)
    if r.oracle is not None:
        r.oracle.fit_task(info)
    protos = F.normalize(torch.stack([F.normalize(i.feats.float().mean(0), dim=0)
                                      for i in identifier_infos(r.identifier)]), dim=-1)
    lam = fusion_weight(cfg.fusion.schedule, t + 1, len(tasks), cfg.fusion.lam_max)
    row, id_row, gw_row, ctrl_row = [], [], [], []
    timing["prototype"] = time.perf_counter() - r.t0 - timing["train"]
    trained_names = [set(x.classnames) for x in tasks[:t + 1]]
    if cfg.method == "continual_ft":  # one group trained on every learned class name
        trained_names = [set().union(*trained_names)]
    for j, other in enumerate(tasks + r.controls):
        res = evaluate_task(cfg.method, model, r.bank, r.backbone.pixels, other, j if j <= t else -1, t + 1,
                            r.identifier, protos, cfg.inter, lam, cfg.train.eval_batch, rank, world,
                            need_images=cfg.identifier.backend == "mllm", trained_names=trained_names)
        (row if j < len(tasks) else ctrl_row).append(res["acc"])
        id_row.append(res["id_acc"])
        gw_row.append(res["group_weights"])
    timing["eval"] = time.perf_counter() - r.t0 - timing["train"] - timing["prototype"]
    for v in cfg.eval.variants:  # same groups, another test-time path
        atoms = v.split("+")
        ident = r.oracle if "oracle" in atoms else r.identifier
        progress["variants"][v].append([
            evaluate_task("trge", model, r.bank, r.backbone.pixels, other, j if j <= t else -1, t + 1, ident,
                          protos, variant_inter(v, cfg.inter), 0.0 if "no_fusion" in atoms else lam,
                          cfg.train.eval_batch, rank, world, trained_names=trained_names)["acc"]
            for j, other in enumerate(tasks)])
    progress["rows"].append(row)
    progress["control_rows"].append(ctrl_row)
    progress["id_rows"].append(id_row)
    progress["gw_rows"].append(gw_row)
    progress["infos"].append({"name": info.name, "classnames": info.class_names, "feats": feats.tolist(),
                              "description": info.description})
    progress["pool_frozen"] = r.baseline.frozen_state()
    progress["seconds"].append(time.perf_counter() - r.t0)
    timing["variants"] = progress["seconds"][-1] - timing["train"] - timing["prototype"] - timing["eval"]
    progress["timing"]["tasks"].append(timing)


def identifier_infos(identifier) -> list[TaskInfo]:
    return getattr(identifier, "inner", identifier).tasks


def _log_stage(monitor, cfg, tasks, controls, progress, t, step) -> None:
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
