"""Inter-group routing: which learned groups a sample uses, and with what weights.

Inputs per sample: the identified task k (or ``UNSEEN`` = -1), its frozen image
embedding f0 (L2-normalised) and the task prototypes P_j (mean frozen image
embedding of task j, re-normalised).  Output: weights [B, T] over all groups,
zero for groups not yet learned, each row summing to 1, at most ``max_groups``
non-zero.  Readings (``READINGS``; the paper gives only "task identifiers and
task prototype distance"):

* ``own``: the identified group alone (the "no inter-group routing" ablation);
  unseen samples take their nearest prototype's group.
* ``task_anchored`` (a): S = {k} + the nearest other groups of P_k (d <= tau),
  weights softmax(-d(P_k, P_j) / temperature) over S; d(P_k, P_k) = 0 so k dominates.
* ``sample_anchored`` (b): k gets raw weight 1, every other learned group
  beta * softmax(-d(f0, P_j) / temperature); normalised.  With beta < 1 k dominates.

Unseen samples (all readings but ``own``): softmax(-d(f0, P_j) / temperature)
over the learned groups -- the adapted path that fusion mixes with the frozen model.
d is the cosine distance 1 - cos.

The text tower (the class prompts of the test set) is routed by ``text_routing``:

* ``image``: every class prompt goes through the groups the *image* was routed to,
  with the image's weights (MoE-Adapters: one task id drives both towers).
* ``vocabulary``: as ``image``, except that a group embeds only the class names it
  was trained on; any other class name keeps its frozen embedding in that group's
  slot.  The text tower's input is its own task identifier: a group trained on
  eight emoji group names has no business re-embedding "pizza".

``unknown_names: unseen`` adds the label set to the image identifier: a sample
identified as task k is treated as unseen (fused) when the test set's class names
include none that task k was trained on -- the classifier itself says the task is
new, whatever the image looks like.  MTIL scores each test set with its own class
names, so the names are known at test time; RAIL's rule (a zero-shot argmax
outside the learned classes means unseen) uses the same information.

``group_filter`` extends the vocabulary reading to the image tower (a group's
image adapter was trained against the text embeddings of its own class names;
against names it never saw, its shift has no counterpart):

* ``novel_set`` (default): when *no* learned group was trained on any of the test
  set's class names, no group takes part -- an all-zero row, the sample's adapted
  path is the frozen model, so fusion cannot move an entirely new label set away
  from zero-shot.  Otherwise routing is unchanged.
* ``vocabulary``: every group must know at least one of the class names.  With
  disjoint label sets this lets the names pick the groups -- close to oracle task
  ids, so it is a labelled variant, not the default.
* ``none``: routing ignores the class names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

UNSEEN = -1
READINGS = ("own", "task_anchored", "sample_anchored")
TEXT_ROUTINGS = ("image", "vocabulary")
UNKNOWN_NAMES = ("route", "unseen")
GROUP_FILTERS = ("none", "novel_set", "vocabulary")


@dataclass
class InterGroupConfig:
    reading: str = "sample_anchored"
    temperature: float = 0.1
    tau: float = 0.5  # task_anchored: max prototype distance of a collaborating group
    beta: float = 0.5  # sample_anchored: total share offered to the other groups
    max_groups: int = 2
    text_routing: str = "vocabulary"  # vocabulary | image (MoE-Adapters); see the module docstring
    unknown_names: str = "unseen"  # unseen | route: identified task never trained on these class names
    group_filter: str = "novel_set"  # novel_set | vocabulary | none (see the module docstring)

    def check(self) -> None:
        from desmoe.config import bad

        if self.reading not in READINGS:
            raise bad("reading", "one of " + ", ".join(READINGS), self.reading)
        if self.text_routing not in TEXT_ROUTINGS:
            raise bad("text_routing", "one of " + ", ".join(TEXT_ROUTINGS), self.text_routing)
        if self.unknown_names not in UNKNOWN_NAMES:
            raise bad("unknown_names", "one of " + ", ".join(UNKNOWN_NAMES), self.unknown_names)
        if self.group_filter not in GROUP_FILTERS:
            raise bad("group_filter", "one of " + ", ".join(GROUP_FILTERS), self.group_filter)
        if self.temperature <= 0:
            raise bad("temperature", "a number > 0", self.temperature)
        if self.max_groups < 1:  # 0 would zero every row: the frozen model, without a word
            raise bad("max_groups", "an integer >= 1", self.max_groups)
        if not 0 <= self.beta < 1:
            raise bad("beta", "a number in [0, 1) so the identified group dominates", self.beta)
        # a key only another reading reads is refused, not ignored (beta with task_anchored changed nothing)
        for key, reading in (("tau", "task_anchored"), ("beta", "sample_anchored")):
            if self.reading != reading and getattr(self, key) != getattr(InterGroupConfig, key):
                raise bad(key, f"unset with inter.reading={self.reading} (it applies to {reading} only)",
                          getattr(self, key))
        # one group a sample (own, or max_groups=1 keeping a row's largest weight) is the argmin of the distances,
        # which no temperature > 0 moves: a temperature set there changed no number
        if (self.reading == "own" or self.max_groups == 1) and self.temperature != InterGroupConfig.temperature:
            why = "inter.reading=own" if self.reading == "own" else "inter.max_groups=1"
            raise bad("temperature", f"unset with {why} (one group a sample: the nearest, whatever the "
                                     f"temperature)", self.temperature)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """[n, D] x [m, D] -> [n, m] of 1 - cos."""
    return 1.0 - torch.nn.functional.normalize(a.float(), dim=-1) @ torch.nn.functional.normalize(b.float(), dim=-1).t()


def _top_m(weights: Tensor, m: int) -> Tensor:
    """Keep the m largest entries per row and renormalise to sum 1 (an all-zero row stays zero)."""
    if m < weights.shape[1]:
        keep = torch.zeros_like(weights, dtype=torch.bool).scatter(1, torch.topk(weights, m, dim=1).indices, True)
        weights = weights * keep
    return weights / weights.sum(1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def group_weights(cfg: InterGroupConfig, task_ids: Tensor, f0: Tensor, prototypes: Tensor,
                  num_groups: int, usable: Optional[Tensor] = None) -> Tensor:
    """[B, num_groups] inter-group weights; prototypes [L, D] of the L learned tasks 0..L-1.
    ``usable`` [L] bool (``group_filter``): only these groups may take weight; a row left
    without any is all zero (the sample's adapted path is the frozen model)."""
    learned = prototypes.shape[0]
    if learned < 1:
        raise ValueError("inter-group routing needs at least one learned task prototype")
    if int(task_ids.max()) >= learned:
        raise ValueError(f"task id {int(task_ids.max())} is not among the {learned} learned tasks")
    B = task_ids.shape[0]
    d_sample = cosine_distance(f0, prototypes)  # [B, L]
    seen = task_ids >= 0
    k = task_ids.clamp_min(0)
    if cfg.reading == "own":
        unseen_w = torch.nn.functional.one_hot(d_sample.argmin(1), learned).float()
        seen_w = torch.nn.functional.one_hot(k, learned).float()
    else:
        unseen_w = torch.softmax(-d_sample / cfg.temperature, dim=1)
        if cfg.reading == "task_anchored":
            d_task = cosine_distance(prototypes, prototypes)[k]  # [B, L]
            allowed = (d_task <= cfg.tau) | torch.nn.functional.one_hot(k, learned).bool()
            seen_w = torch.softmax((-d_task / cfg.temperature).masked_fill(~allowed, float("-inf")), dim=1)
        else:
            others = cfg.beta * torch.softmax(
                (-d_sample / cfg.temperature).scatter(1, k[:, None], float("-inf")), dim=1) if learned > 1 \
                else torch.zeros(B, 1, device=f0.device)
            seen_w = others.nan_to_num(0.0).scatter(1, k[:, None], 1.0)
    w = torch.where(seen[:, None], seen_w, unseen_w)
    if usable is not None:
        w = w * usable[:learned].to(w.device).float()
    w = _top_m(w, cfg.max_groups)
    out = torch.zeros(B, num_groups, device=w.device)  # the device the features and prototypes are on
    out[:, :learned] = w
    return out


def one_hot_weights(task: int, batch: int, num_groups: int, device=None) -> Tensor:
    """Training task ``task`` (and text prompts of a known task) use their own group only."""
    w = torch.zeros(batch, num_groups, device=device)
    w[:, task] = 1.0
    return w


def vocabulary_mask(class_names: list[str], trained: list[set[str]]) -> Tensor:
    """[G, C] bool: group g was trained on class name c (text routing ``vocabulary``)."""
    return torch.tensor([[c in names for c in class_names] for names in trained], dtype=torch.bool)
