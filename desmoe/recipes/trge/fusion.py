"""Fusion of frozen-model and adapted outputs for samples judged unseen.

After t of T tasks, an unseen sample gets

    p(y|x) = (1 - lambda_t) * softmax(z_frozen) + lambda_t * softmax(z_adapted)

where z_adapted routes over the learned groups by prototype distance.  The
schedule is a switch (``FUSION_SCHEDULES``); ``progress`` (t/T) trusts the experts
more as more tasks are learned.  ``frozen`` (lambda = 0) is the "no fusion"
ablation: unseen samples fall back to the frozen model.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _progress(t: int, total: int, lam_max: float) -> float:
    return lam_max * min(1.0, t / total)


def _constant(t: int, total: int, lam_max: float) -> float:
    return lam_max


def _frozen(t: int, total: int, lam_max: float) -> float:
    return 0.0


def _adapted(t: int, total: int, lam_max: float) -> float:
    return 1.0


FUSION_SCHEDULES: dict[str, Callable[[int, int, float], float]] = {
    "progress": _progress, "constant": _constant, "frozen": _frozen, "adapted": _adapted,
}


def fusion_weight(schedule: str, tasks_learned: int, total_tasks: int, lam_max: float = 1.0) -> float:
    if schedule not in FUSION_SCHEDULES:
        raise ValueError(f"unknown fusion schedule '{schedule}' (known: {', '.join(FUSION_SCHEDULES)})")
    return float(FUSION_SCHEDULES[schedule](tasks_learned, max(total_tasks, 1), lam_max))


def fuse(frozen_logits: Tensor, adapted_logits: Tensor, lam: float) -> Tensor:
    """Probability-space mixture; returns probabilities [B, C]."""
    return (1.0 - lam) * frozen_logits.float().softmax(-1) + lam * adapted_logits.float().softmax(-1)


def fuse_where(unseen: Tensor, seen_probs: Tensor, frozen_logits: Tensor, adapted_logits: Tensor,
               lam: float) -> Tensor:
    """Per sample: seen samples keep their adapted probabilities, unseen ones are fused."""
    fused = fuse(frozen_logits, adapted_logits, lam)
    return torch.where(unseen.unsqueeze(1), fused, seen_probs.float())
