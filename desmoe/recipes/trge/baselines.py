"""Baselines that share TRGE's adapters, budget and training loop.

* ``zero_shot``: the frozen model, no training.
* ``continual_ft``: one group of N_g adapters trained on every task in turn
  (no new groups, no freezing): continual fine-tuning of the same adapters.
* ``shared_pool``: MoE-Adapters-style. One pool of T * N_g experts per site, one
  noisy top-k router per task over the whole pool; after each task the
  ``pool_freeze_per_task`` experts its router used most in every block are frozen
  for good (activity-aware freezing).  At test time the identified task's router
  is used; unseen samples go to the frozen model (MoE-Adapters' DDAS switch).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.moe.router import Router, Routing
from desmoe.recipes.trge.fusion import fuse_where
from desmoe.recipes.trge.inter_group import UNSEEN, group_weights, one_hot_weights
from desmoe.recipes.trge.intra_group import GroupContext, TaskGate

METHODS = ("trge", "zero_shot", "continual_ft", "shared_pool")  # the registry's keys (METHODS_BY_NAME, below)


class PoolRouter(Router):
    """Per-task noisy top-k gates over one shared pool; the task comes from the context
    (row-wise argmax of its group weights, which are one-hot for this baseline)."""

    def __init__(self, hidden_size: int, num_tasks: int, num_experts: int, k: int, context: GroupContext,
                 noisy: bool = True) -> None:
        super().__init__(num_experts, k)
        self.gates = nn.ModuleList(TaskGate(hidden_size, num_experts) for _ in range(num_tasks))
        self.context, self.noisy = context, noisy

    def forward(self, x: Tensor) -> Routing:
        task = self.context.group_weights.to(x.device).argmax(1)  # [S]
        w = torch.stack([g.w_gate for g in self.gates]).float()[task]  # [S, d, E]
        logits = torch.einsum("sd,sde->se", x.float(), w)
        noisy = logits
        if self.training and self.noisy:
            wn = torch.stack([g.w_noise for g in self.gates]).float()[task]
            noisy = logits + self.context.noise(self, logits) * (F.softplus(torch.einsum("sd,sde->se", x.float(), wn)) + 1e-2)
        top, ids = torch.topk(noisy, self.k, dim=-1)
        gate = top.softmax(-1)
        scores = torch.zeros_like(logits).scatter(1, ids, gate)
        return Routing(logits=logits, scores=scores, expert_ids=ids, weights=gate)


class PoolUsage:
    """Counts routes per (block, expert) while a task trains; freezes the most used."""

    def __init__(self, blocks: list, per_task: int, text: Optional[list[bool]] = None) -> None:
        self.blocks, self.per_task = blocks, per_task
        self.text = text or [False] * len(blocks)  # blocks of the text tower
        self.frozen: list[set[int]] = [set() for _ in blocks]
        self.reset()

    def reset(self) -> None:
        self.counts = [torch.zeros(b.num_experts) for b in self.blocks]

    def record(self, micro: int = 0) -> None:
        """After micro-batch ``micro``'s forward.  Every micro-batch of a step routes the same class prompts
        as the first (accumulate.py): the text tower's routes count once a step, as in one big batch."""
        for i, (b, text) in enumerate(zip(self.blocks, self.text)):
            if b.last_stats is not None and not (text and micro):
                routed = b.last_stats.tokens_per_expert
                # counted where the routes are (a no-op once there): no read-back per step
                self.counts[i] = self.counts[i].to(routed.device)
                self.counts[i] += routed.float()

    def freeze_most_used(self, reduce=None) -> None:
        for b, c in enumerate(self.counts):
            if reduce is not None:
                reduce(c)  # the same choice on every rank
            ranked = torch.argsort(c, descending=True, stable=True).tolist()  # one read-back per block
            order = [e for e in ranked if e not in self.frozen[b]]
            self.frozen[b].update(order[: self.per_task])
        self.reset()

    def apply(self, trainability) -> None:
        for b, block in enumerate(self.blocks):
            trainability.set_experts(b, [e for e in range(block.num_experts) if e not in self.frozen[b]])


class Method:
    """What one method (TRGE or a baseline) changes in the training of a task and at test time;
    picked by ``method``.

    TRGE itself: one group per task, trained alone; its optimizer groups are whole task groups.
    The test-time part (evaluate.evaluate_task) is class-level: the evaluator needs no instance."""

    trains = True
    layout = None  # a groups.layout the method needs (None: the configured one)
    test_variants = True  # eval.variants are TRGE's other test-time paths over its groups
    identifies = True  # test time: samples are routed by the task identifier (its accuracy is reported)
    text_groups = True  # test time: class embeddings through the learned groups (else frozen only)

    @staticmethod
    def train_group(task: int) -> int:
        """The group task ``task`` trains: its own."""
        return task

    def trainable_per_task(self, model, progress) -> int:
        """Parameters one task trains (the summary's budget column)."""
        return model.trainable_parameters() if self.trains else 0

    @staticmethod
    def groups_used(learned: int) -> int:
        """How many groups' class embeddings the test sets use."""
        return learned

    @staticmethod
    def fixed_groups(learned: int) -> int:
        """Groups whose cached class embeddings stay valid: only TRGE's finished groups never change."""
        return learned - 1

    @staticmethod
    def trained_names(per_task: list[set[str]]) -> list[set[str]]:
        """The class names each group was trained on, from those of each learned task."""
        return per_task

    @staticmethod
    def predict(b, ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(predicted classes [B], group weights [B, T]) of one test batch ``b`` (evaluate.TestBatch);
        ``ids``: the identified tasks (UNSEEN -1), None when the method does not identify.
        TRGE: inter-group weights, the groups' mixed classifier, unseen samples fused with the frozen model."""
        unseen = ids == UNSEEN
        w = group_weights(b.inter, ids, b.f0, b.prototypes, b.T, b.usable)
        none = w.sum(1) == 0  # no group knows these names: the adapted path is the frozen model
        wr = torch.where(none[:, None], one_hot_weights(0, b.n, b.T, device=w.device), w)  # a placeholder route
        fa = b.model.image_features(b.px, wr, cnn_features=b.cnn)
        wmix = F.normalize(torch.einsum("bg,gcd->bcd", wr[:, :b.groups_used], b.Wg), dim=-1)
        za = torch.where(none[:, None], b.z0, b.scale * torch.einsum("bd,bcd->bc", fa, wmix))
        probs = fuse_where(unseen, za.softmax(-1), b.z0, za, b.lam)
        return probs.argmax(1), w

    def __init__(self, cfg, model) -> None:
        self.cfg, self.model = cfg, model

    def expert_unit(self, model):
        """Experts frozen together share one optimizer group: a whole task group."""
        from desmoe.recipes.trge.groups import group_unit

        return group_unit(model)

    def set_trainable(self, trainability, group: int) -> None:
        from desmoe.recipes.trge.groups import train_only_group

        train_only_group(trainability, self.model, group)

    def record(self, micro: int) -> None:
        """After each micro-batch's forward (routing statistics)."""

    def end_task(self) -> None:
        """After the last step of a task."""

    def counts_state(self) -> list:
        return []

    def frozen_state(self) -> list:
        return []

    def load_state(self, progress: dict, mid_task, task: int) -> None:
        """From a checkpoint: ``progress`` at its last task end, ``mid_task`` if taken inside ``task``."""


class ZeroShot(Method):
    trains = False
    test_variants = False
    identifies = False
    text_groups = False

    @staticmethod
    def fixed_groups(learned):
        return 0

    @staticmethod
    def predict(b, ids):
        return b.z0.argmax(1), torch.zeros(b.n, b.T, device=b.z0.device)


class ContinualFT(Method):
    """One group (group 0) trained on every task in turn; see the module doc."""

    test_variants = False
    identifies = False

    @staticmethod
    def train_group(task):
        return 0

    @staticmethod
    def groups_used(learned):
        return 1

    @staticmethod
    def fixed_groups(learned):
        return 0  # group 0 keeps changing

    @staticmethod
    def trained_names(per_task):
        return [set().union(*per_task)]  # one group trained on every learned class name

    @staticmethod
    def predict(b, ids):
        w = one_hot_weights(0, b.n, b.T, device=b.f0.device)
        return (b.scale * b.model.image_features(b.px, w, cnn_features=b.cnn) @ b.Wg[0].t()).argmax(1), w


class SharedPool(Method):
    """MoE-Adapters: per-task routers over one pool, the most used experts frozen after each task."""

    layout = "pool"
    test_variants = False

    def __init__(self, cfg, model) -> None:
        from desmoe.moe.layer import moe_blocks

        super().__init__(cfg, model)
        blocks = moe_blocks(model)
        self.usage = PoolUsage(blocks, cfg.groups.pool_freeze_per_task,
                               text=[b.router.context is model.contexts["text"] for b in blocks])

    def expert_unit(self, model):
        return None  # single experts freeze: one optimizer group each

    def set_trainable(self, trainability, group):
        self.usage.apply(trainability)
        for part in trainability.parts:
            if part.startswith("gate"):
                trainability.set_part(part, part == f"gate{group}")

    def record(self, micro):
        self.usage.record(micro)

    def end_task(self):
        from desmoe.collectives import all_reduce_

        self.usage.freeze_most_used(reduce=all_reduce_)

    def counts_state(self):
        """This task's route counts so far, summed over ranks (collective).  A checkpoint keeps rank 0's client
        state only: per-rank counts gave every rank rank 0's on resume, so the experts frozen after the task
        differed from the uninterrupted run's (its losses parted one step into the next task)."""
        from desmoe.collectives import all_reduce_

        return [all_reduce_(c.clone()).tolist() for c in self.usage.counts]

    def frozen_state(self):
        return [sorted(f) for f in self.usage.frozen]

    def trainable_per_task(self, model, progress):
        """The pool's experts not frozen before the last task, and one task's gate, per block."""
        from desmoe.moe.layer import moe_blocks

        total = 0
        for b, block in enumerate(moe_blocks(model)):
            per_expert = sum(p.numel() for p in block.local_experts[0].parameters())
            # each finished task froze pool_freeze_per_task more experts, or the rest (freeze_most_used): the
            # count before the last task, not "all frozen now minus one task's share", which is wrong
            # once the pool ran out (e.g. 6 per task of 6 experts: nothing trained after the first task)
            frozen_before_last = min(block.num_experts,
                                     self.cfg.groups.pool_freeze_per_task * max(len(progress["rows"]) - 1, 0))
            total += (block.num_experts - frozen_before_last) * per_expert
            total += sum(p.numel() for p in block.router.gates[0].parameters())
        return total

    @staticmethod
    def fixed_groups(learned):
        return 0  # the shared pool keeps changing

    @staticmethod
    def predict(b, ids):
        """The identified task's router; unseen samples -> the frozen model."""
        unseen = ids == UNSEEN
        w = F.one_hot(ids.clamp_min(0), b.T).float()
        za = b.scale * torch.einsum("bd,bcd->bc", b.model.image_features(b.px, w, cnn_features=b.cnn),
                                    b.Wg[ids.clamp_min(0)])
        return torch.where(unseen, b.z0.argmax(1), za.argmax(1)), w * (~unseen)[:, None]

    def load_state(self, progress, mid_task, task):
        if progress["pool_frozen"]:
            self.usage.frozen = [set(f) for f in progress["pool_frozen"]]
        if mid_task and mid_task["task"] == task:
            from desmoe.distributed import is_rank0

            # the ranks' sum, once: freeze_most_used sums the ranks' counts again at the task's end
            self.usage.counts = [torch.tensor(c) if is_rank0() else torch.zeros(len(c)) for c in mid_task["pool_counts"]]


METHODS_BY_NAME = {"trge": Method, "zero_shot": ZeroShot, "continual_ft": ContinualFT, "shared_pool": SharedPool}


def build_method(cfg, model) -> Method:
    return METHODS_BY_NAME[cfg.method](cfg, model)
