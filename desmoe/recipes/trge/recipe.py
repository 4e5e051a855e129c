"""The TRGE continual-learning recipe: tasks in order (one trainer stage each), one expert group each.

    for task t:  train group t (+ its gate) only  ->  prototype + identifier from frozen features
                 ->  evaluate every test set  ->  row t of the accuracy matrix  ->  checkpoint
    at the end:  Transfer / Avg / Last (ZSCL), table + CSV + heatmaps in the run dir

Baselines (``method``) are classes of ``desmoe.recipes.trge.baselines`` on the same recipe.
Resumable: a checkpoint after every task holds the engine state plus the rows,
prototypes and identifier inputs so far (and, inside a task, the step).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from desmoe.config import bad
from desmoe.recipes.trge.accumulate import StepDraws, check_image_tower
from desmoe.recipes.trge.backbones import load_backbone
from desmoe.recipes.trge.baselines import METHODS_BY_NAME, build_method
from desmoe.recipes.trge.config import TrainConfig, TRGEExperiment  # noqa: F401  (TRGEExperiment: users)
from desmoe.recipes.trge.data import load_sequence
from desmoe.recipes.trge.evaluate import TextBank, evaluate_stage
from desmoe.recipes.trge.features import frozen_cnn_table
from desmoe.recipes.trge.features import key as feature_key
from desmoe.recipes.trge.groups import gate_parts, setup_groups
from desmoe.recipes.trge.inter_group import one_hot_weights
from desmoe.recipes.trge.model import TRGEModel
from desmoe.recipes.trge.results import log_stage, summarize, write_reports
from desmoe.recipes.trge.task_id import (OracleIdentifier, TaskInfo, build_identifier, check_calibration,
                                         load_mllm)
from desmoe.training.trainer import RESUMABLE_KEYS, Cadence, Recipe, Setup, Trainer


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine to zero, restarted for every task (MoE-Adapters)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps_per_task - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def _cached_features(cfg: TRGEExperiment, table, task, steps: int, gen: torch.Generator):
    """(sample indices per micro-batch of the task, frozen pooled CNN features of the task's training
    images), or None when ``train.cache_image_features`` is off or the image tower is not a CNN (``table``
    None).  Row ``step * grad_accum + micro``: a step's micro-batches cut the step's draw of
    ``micro_batch * grad_accum`` samples, so a step draws what one batch of that size draws."""
    if not cfg.train.cache_image_features or table is None:
        return None
    t = cfg.train
    sels = torch.randint(len(task.train_y), (steps, t.micro_batch * t.grad_accum), generator=gen)
    return sels.reshape(steps * t.grad_accum, t.micro_batch), table[feature_key(task.name, "train")]


class TRGERecipe(Recipe):
    """One stage per task: train the task's group, then prototype, identifier and the evaluation of
    every test set (a row of the accuracy matrix) at the stage end."""

    resumable_keys = RESUMABLE_KEYS + ("eval.",)  # test-time variants may be added on resume
    trainable_only = True  # the frozen backbone is rebuilt by every run
    logs_expert_load = False
    throughput = "samples"
    # why another world size is refused (desmoe/reshard.py): a step's samples, crops and gate noise come from
    # generators seeded per rank (setup, begin_stage, _step_images), which fewer or more ranks cannot replay
    inelastic = ("each rank draws its samples, crops and gates' training noise from generators seeded by its rank, "
                 "which another number of ranks cannot replay")

    def __init__(self, cfg: TRGEExperiment) -> None:
        super().__init__(cfg)
        self.name = cfg.method
        if cfg.identifier.per_batch:  # the vote is per evaluation batch: another train.eval_batch changes the rows
            self.resumable_keys = tuple(k for k in self.resumable_keys if k != "train.eval_")

    def setup(self, trainer: Trainer) -> Setup:
        from desmoe.distributed import prepare_in_turn

        from desmoe.recipes.trge.backbones import check_path

        cfg = self.cfg
        check_path(cfg.backbone)  # a wrong model path is named before the data is decoded, not after
        if cfg.identifier.backend == "mllm" and not (Path(cfg.identifier.mllm_path) / "config.json").is_file():
            load_mllm(cfg.identifier.mllm_path)  # its one line for a folder that is not a model
        # the first use builds the image data and fetches the towers: one rank at a time, never racing
        self.tasks, self.controls = prepare_in_turn(lambda: load_sequence(cfg.data))
        if cfg.groups.num_tasks == 0:
            cfg.groups.num_tasks = len(self.tasks)
        if cfg.groups.num_tasks < len(self.tasks):
            raise bad("groups.num_tasks", f">= the {len(self.tasks)} tasks of the sequence (or 0)", cfg.groups.num_tasks)
        if not cfg.groups.layout:  # unset: the method's own, before the model is built (a conflict: config.py)
            cfg.groups.layout = METHODS_BY_NAME[cfg.method].layout or "groups"
        if cfg.identifier.backend in ("prototype", "gaussian"):  # before training, not at the first task's end
            for t in self.tasks:  # the identifier's samples: proto_samples of the task's images, or all of them
                check_calibration(t.name, min(len(t.train_y), cfg.train.proto_samples),
                                  cfg.identifier.calibration_split, cfg.train.proto_samples)
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
        check_image_tower(model, cfg.train.grad_accum)
        return Setup(model, cfg.train.micro_batch, lr=cfg.train.lr, parts=gate_parts(T),
                     expert_unit=self.baseline.expert_unit(model), grad_accum=cfg.train.grad_accum)

    def attach(self, trainer, state):
        cfg, progress = self.cfg, state["progress"] if state else {
            "rows": [], "control_rows": [], "id_rows": [], "gw_rows": [], "infos": [], "pool_frozen": [],
            "seconds": [], "variants": {v: [] for v in self.cfg.eval.variants}}
        for info in progress["infos"]:  # identifier and prototypes from the stored frozen features
            # on the model's device, where an uninterrupted run fitted them (evaluate_stage)
            stored = TaskInfo(info["name"], info["classnames"], torch.tensor(info["feats"]).to(self.model.device),
                              description=info.get("description"))
            self.identifier.fit_task(stored)
            if self.oracle is not None:
                self.oracle.fit_task(stored)
        for v in cfg.eval.variants:  # a resumed run may ask for a variant the checkpoint did not track
            if v not in progress["variants"] and progress["rows"] and trainer.rank == 0:
                print(f"desmoe: warning: eval.variants '{v}' is new to this resumed run: evaluated after task "
                      f"{len(progress['rows']) + 1} on only, so results.json has its rows but no Transfer/Avg/Last",
                      flush=True)
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
        return [self.cfg.train.steps_per_task if self.baseline.trains else 0] * len(self.tasks)

    def tokens_per_step(self):
        return self.cfg.train.micro_batch * self.cfg.train.grad_accum * self.trainer.world

    def begin_stage(self, t, first_step):
        cfg, T, task = self.cfg, self.cfg.groups.num_tasks, self.tasks[t]
        self.t0, self.timing = time.perf_counter(), {}
        group = self.baseline.train_group(t)
        self.model.train()
        if not self.stages()[t]:
            return
        self.baseline.set_trainable(self.trainer.trainability, group)
        # the stage's fixed inputs on the engine's device once (DeepSpeed does not move a forward's inputs)
        dev = self.trainer.engine.device
        self.ids, self.mask = (x.to(dev) for x in self.backbone.tokenize(task.prompts()))
        self.w_img = one_hot_weights(group, cfg.train.micro_batch, T).to(dev)
        self.w_txt = one_hot_weights(group, len(self.ids), T).to(dev)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + 17 * t + self.trainer.rank)
        self.cached = _cached_features(cfg, self.table, task, self.stages()[t], gen)
        accum = cfg.train.grad_accum
        self.draws = StepDraws(accum, self.trainer.engine.device) if accum > 1 else None

    def lr(self, t, step):
        return _lr(self.cfg.train, step)

    def step(self, t, step, micro):
        """Micro-batch ``micro`` of ``step``: rows ``micro * b ..`` of the step's ``b * grad_accum`` samples, a
        pure function of (seed, task, step, rank); the loss is their mean cross-entropy, which DeepSpeed
        divides by grad_accum (accumulate.py: why that and the step's random draws make it one big batch)."""
        cfg, task, engine, accum = self.cfg, self.tasks[t], self.trainer.engine, self.cfg.train.grad_accum
        if micro == 0:
            self.step_loss = 0.0
            if self.cached is None:  # the step's images, cropped at once as one batch of them is
                self.images = self._step_images(t, step)
        if self.cached is not None:  # frozen CNN features of this micro-batch's images, computed once
            sel = self.cached[0][step * accum + micro]
            px, y, cnn = None, task.train_y[sel], self.cached[1][sel]
        else:
            rows = slice(micro * cfg.train.micro_batch, (micro + 1) * cfg.train.micro_batch)
            px, y, cnn = self.images[0][rows], self.images[1][rows], None
        px, y, cnn = (None if x is None else x.to(engine.device) for x in (px, y, cnn))  # host-side data
        if self.draws is not None:
            self.draws.start(micro)
        with self.model.drawing(self.draws) if self.draws is not None else nullcontext():
            logits = engine(px, self.ids, self.mask, self.w_img, self.w_txt, cnn_features=cnn)
        self.baseline.record(micro)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
        # no read-back here (each waits for the device): the trainer reads the step's values once, and the
        # logged mean is read at the log cadence; float64 adds them as the host floats were added
        value = loss.detach()
        self.step_loss = self.step_loss + value.double() / accum
        self.at = (t, step)
        return loss, value

    def _step_images(self, t, step):
        """(pixels, labels) of the step's ``micro_batch * grad_accum`` training images, randomly cropped."""
        from desmoe.vision.transforms import random_resized_crop

        cfg, task = self.cfg, self.tasks[t]
        g = torch.Generator().manual_seed(cfg.train.seed * 10**6 + 1009 * t + 17 * step + self.trainer.rank)
        sel = torch.randint(len(task.train_y), (cfg.train.micro_batch * cfg.train.grad_accum,), generator=g)
        return self.backbone.pixels(random_resized_crop(task.train_x[sel], g)), task.train_y[sel]

    def end_step(self, t, step):
        self.mid = {"task": t, "step": step + 1}

    def log(self, done):
        return {"train/loss": float(self.step_loss), "train/lr": _lr(self.cfg.train, self.at[1])}

    def state_dict(self):
        # collective (every rank saves): the pool's route counts are summed over ranks when a checkpoint is taken
        mid = {**self.mid, "pool_counts": self.baseline.counts_state()} if self.mid else None
        return {"progress": self.progress, **({"mid_task": mid} if mid else {})}

    def end_stage(self, t, done):
        if self.stages()[t]:
            self.baseline.end_task()
        self.mid = None
        self.model.eval()
        self.timing["train"] = time.perf_counter() - self.t0
        evaluate_stage(self, t)
        log_stage(self.trainer.monitor, self.cfg, self.tasks, self.controls, self.progress, t, done)

    def summary(self, trainer):
        from desmoe.distributed import is_rank0

        summary = summarize(self.cfg, self.tasks, self.controls, self.progress, self.model, self.baseline)
        if is_rank0():
            write_reports(trainer.run_dir, summary, self.tasks, self.controls, self.progress)
        return summary


def run_trge(cfg: TRGEExperiment, ds_config_path: str) -> dict:
    return Trainer(TRGERecipe(cfg), ds_config_path).run()


