"""Evaluation after each task: every test set with its own class names.

Per sample: frozen features f0 -> task identifier -> inter-group weights -> the
adapted image feature and a per-sample text classifier (the learned groups'
class embeddings mixed by the same weights); samples judged unseen are fused
with the frozen model's prediction by training progress.  The test set's class
names take part as the protocol gives them (``inter.text_routing``,
``unknown_names``, ``group_filter``: see inter_group.py).  Test sets are sharded
over the ranks and counts all-reduced, so every rank ends with the same numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from desmoe.recipes.trge.features import key as feature_key
from desmoe.recipes.trge.fusion import fusion_weight
from desmoe.recipes.trge.inter_group import UNSEEN, InterGroupConfig, one_hot_weights, vocabulary_mask
from desmoe.recipes.trge.task_id import IdBatch, TaskIdentifier, TaskInfo


class TextBank:
    """Class embeddings per (task, group), cached: a finished group never changes."""

    def __init__(self, model, tokenize, num_groups: int, cnn_table: Optional[dict] = None) -> None:
        self.model, self.tokenize, self.num_groups = model, tokenize, num_groups
        self.cnn_table = cnn_table  # desmoe.recipes.trge.features: frozen CNN features of every image, or None
        self.cache: dict[tuple[str, int], Tensor] = {}
        # Frozen image inputs per (test set, batch start): f0 and, for a CNN tower, its pooled
        # features -- the same at every stage, so computed once per run.
        self.images: dict[tuple[str, int], tuple[Tensor, Optional[Tensor]]] = {}

    @torch.no_grad()
    def get(self, task, group: int, frozen_until: int) -> Tensor:
        """[C, D]; group -1 = frozen model.  Entries of groups >= frozen_until are recomputed."""
        key = (task.name, group)
        if key in self.cache and group < frozen_until:
            return self.cache[key]
        feats = []
        for template in task.templates:
            ids, mask = self.tokenize(task.prompts(template))
            w = None if group < 0 else one_hot_weights(group, len(ids), self.num_groups, device=self.model.device)
            feats.append(self.model.text_features(ids, mask, w))
        out = F.normalize(torch.stack(feats).mean(0), dim=-1)
        self.cache[key] = out
        return out


def group_class_embeddings(bank: TextBank, task, groups: int, fixed: int, text_routing: str,
                           trained_names: Optional[list[set[str]]] = None) -> Tensor:
    """[G, C, D]: the test set's class embeddings through each of the first G groups.  Under text
    routing ``vocabulary`` a class name group g never trained on keeps its frozen embedding."""
    Wg = torch.stack([bank.get(task, g, fixed) for g in range(groups)])
    if text_routing == "vocabulary":
        known = vocabulary_mask(task.classnames, _names(trained_names, groups))
        Wg = torch.where(known.to(Wg.device)[..., None], Wg, bank.get(task, -1, bank.num_groups)[None])
    return Wg


def _names(trained_names: Optional[list[set[str]]], learned: Optional[int] = None) -> list[set[str]]:
    """The first ``learned`` tasks' trained class names (all when None)."""
    if trained_names is None or (learned is not None and len(trained_names) < learned):
        raise ValueError("routing by vocabulary needs the class names every task was trained on")
    return trained_names[:learned]


def unseen_if_names_unknown(ids: Tensor, class_names: list[str], trained_names: Optional[list[set[str]]]) -> Tensor:
    """Samples identified as a task that was trained on none of ``class_names`` become UNSEEN."""
    return _unseen_where(ids, vocabulary_mask(class_names, _names(trained_names)).any(1))


def _unseen_where(ids: Tensor, knows_names: Tensor) -> Tensor:
    """``knows_names`` [learned tasks] bool: ids of tasks that know none of the names -> UNSEEN."""
    knows_names = knows_names.to(ids.device)  # a host-side mask indexed by device ids would fail
    return torch.where((ids >= 0) & ~knows_names[ids.clamp_min(0)], torch.full_like(ids, UNSEEN), ids)


@dataclass
class TestBatch:
    """What a method's ``predict`` (baselines.py) sees of one test batch."""
    model: object
    px: Optional[Tensor]  # pixels, None when a CNN tower's cached features stand in
    cnn: Optional[Tensor]
    f0: Tensor  # frozen image features
    z0: Tensor  # frozen logits
    Wg: Optional[Tensor]  # [G, C, D] the groups' class embeddings
    scale: float
    n: int
    T: int
    groups_used: int
    inter: InterGroupConfig
    prototypes: Optional[Tensor]
    usable: Optional[Tensor]
    lam: float


@torch.no_grad()
def evaluate_task(method: str, model, bank: TextBank, pixels, task, true_task: int, learned: int,
                  identifier: Optional[TaskIdentifier], prototypes: Optional[Tensor], inter: InterGroupConfig,
                  lam: float, batch_size: int, rank: int, world: int, need_images: bool = False,
                  trained_names: Optional[list[set[str]]] = None) -> dict:
    """Accuracy, identification accuracy and mean group weights on one test set (all ranks).
    ``method``: a name of baselines.METHODS_BY_NAME, whose class holds the method's test-time behaviour.
    ``trained_names[g]``: the class names group g was trained on (text routing ``vocabulary``)."""
    from desmoe.collectives import all_reduce_
    from desmoe.recipes.trge.baselines import METHODS_BY_NAME

    m = METHODS_BY_NAME[method]
    T = bank.num_groups
    idx = torch.arange(rank, len(task.test_y), world)
    W0 = bank.get(task, -1, T)
    groups_used = m.groups_used(learned)
    Wg = group_class_embeddings(bank, task, groups_used, m.fixed_groups(learned), inter.text_routing,
                                trained_names) if m.text_groups else None
    # Per test set, not per batch: which learned tasks know any of its class names, and from that the
    # groups that may take weight (inter.group_filter; None = routing unchanged)
    knows_names, usable, dev = None, None, model.device  # every batch's tensors on the model's device
    if m.identifies and (inter.unknown_names == "unseen" or inter.group_filter != "none"):
        knows_names = vocabulary_mask(task.classnames, _names(trained_names, learned)).any(1).to(dev)
        if inter.group_filter == "vocabulary" or (inter.group_filter == "novel_set" and not knows_names.any()):
            usable = knows_names
    scale = model.scale
    stats = torch.zeros(3 + T, device=dev)  # correct, count, id-correct, summed group weights
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        images, y = task.test_x[sel], task.test_y[sel].to(dev)
        key = (task.name, start)
        if key not in bank.images:
            if bank.cnn_table is not None:
                px, cnn = None, bank.cnn_table[feature_key(task.name, "test")][sel].to(dev)
            else:
                px = pixels(images).to(dev)
                cnn = model.cnn_features(px)
            bank.images[key] = (model.image_features(px, cnn_features=cnn), cnn)
        f0, cnn = bank.images[key]
        px = None if cnn is not None else pixels(images).to(dev)  # a CNN tower needs only its cached features
        z0 = scale * f0 @ W0.t()
        truth = torch.full((len(sel),), true_task, device=dev)
        ids = None
        if m.identifies:
            ids = identifier.identify(IdBatch(f0, images.numpy() if need_images else None, truth)).to(dev)
            if inter.unknown_names == "unseen":
                ids = _unseen_where(ids, knows_names)
            stats[2] += (ids == truth).sum()  # the decision routing acts on
        pred, w = m.predict(TestBatch(model, px, cnn, f0, z0, Wg, scale, len(sel), T, groups_used, inter,
                                      prototypes, usable, lam), ids)
        stats[0] += (pred == y).sum()
        stats[1] += len(sel)
        stats[3:] += w.sum(0)
    stats = all_reduce_(stats).cpu()  # reduced where they are, read on the host in one transfer
    n = max(float(stats[1]), 1.0)
    return {"acc": 100.0 * float(stats[0]) / n, "id_acc": 100.0 * float(stats[2]) / n,
            "group_weights": (stats[3:] / n).tolist()}


def evaluate_stage(r, t: int) -> None:
    """Task t is done: its prototype and identifier inputs from frozen features, then every test set
    (and each test-time variant) evaluated into the progress rows.  ``r``: the run's TRGERecipe."""
    from desmoe.recipes.trge.config import variant_inter
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
    protos = F.normalize(torch.stack([F.normalize(i.feats.float().to(model.device).mean(0), dim=0)
                                      for i in r.identifier.infos]), dim=-1)
    lam = fusion_weight(cfg.fusion.schedule, t + 1, len(tasks), cfg.fusion.lam_max)
    row, id_row, gw_row, ctrl_row = [], [], [], []
    timing["prototype"] = time.perf_counter() - r.t0 - timing["train"]
    trained_names = type(r.baseline).trained_names([set(x.classnames) for x in tasks[:t + 1]])
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
                          cfg.train.eval_batch, rank, world, trained_names=trained_names,
                          # the MLLM identifier reads the images in variants too (a ValueError after task 1)
                          need_images=ident is not r.oracle and cfg.identifier.backend == "mllm")["acc"]
            for j, other in enumerate(tasks)])
        # which task each row follows: a resumed run may add a variant (rows from then on) or drop one (rows up to
        # then), so the rows alone do not say it
        progress.setdefault("variant_after", {}).setdefault(v, []).append(t + 1)
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
