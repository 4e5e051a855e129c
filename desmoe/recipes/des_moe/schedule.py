"""Progressive Parameter Specialization Schedule (DES-MoE Sec. 3.3, Eq. 10-11).

Steps t = 1..T fall into [1, T1] warm-up, (T1, T2] stabilisation, (T2, T]
consolidation, T1 = round(t1 T), T2 = round(t2 T).  Trainable sets:

| phase          | Eq. 11 (default)        | Fig. 1 reading (``warmup: fig1``) |
|----------------|-------------------------|-----------------------------------|
| I warm-up      | router + backbone       | router + all experts              |
| II stabilise   | router + experts of S_d | same                              |
| III consolidate| experts of S_d          | same                              |

"router" is the ALR (or the linear router in the w/o-ALR ablation); the backbone
is every other dense parameter (embeddings, attention, norms, shared experts).
Without DGES, "experts of S_d" means all experts.  Sets are applied to the
optimizer through :class:`~desmoe.moe.trainability.Trainability`, so whatever
is outside stays bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Sequence

from desmoe.config import bad
from desmoe.recipes.des_moe.config import ScheduleConfig
from desmoe.moe.trainability import Trainability

ROUTER_PART, BACKBONE_PART = "router", "other"


class Phase(IntEnum):
    WARMUP = 1
    STABILIZE = 2
    CONSOLIDATE = 3


@dataclass(frozen=True)
class TrainableSet:
    router: bool
    backbone: bool
    experts: str  # "none", "all" or "domain"


def boundaries(total_steps: int, cfg: ScheduleConfig) -> tuple[int, int]:
    return round(cfg.t1 * total_steps), round(cfg.t2 * total_steps)


def check_resumed_boundaries(saved: Sequence[int], total_steps: int, cfg: ScheduleConfig, start: int) -> None:
    """A resumed run may change ``train.steps`` and so T1 and T2, but not a boundary the run has reached
    (or would have reached) by step ``start``: moving one re-opens a phase after the fact (routers train
    again after consolidation) and moves DGES's refreshes, which count from T1."""
    now = boundaries(total_steps, cfg)
    if any(old != new and min(old, new) <= start for old, new in zip(saved, now)):
        raise bad("train.steps", f"a value that keeps the phase boundaries reached by the resumed step {start} "
                  f"(T1={saved[0]}, T2={saved[1]}; this gives T1={now[0]}, T2={now[1]}): keep it or use a new "
                  f"run.name", total_steps)


def phase_at(step: int, total_steps: int, cfg: ScheduleConfig) -> Phase:
    """Phase of the step with 0-based index ``step`` (the paper's t = step + 1)."""
    t1, t2 = boundaries(total_steps, cfg)
    t = step + 1
    return Phase.WARMUP if t <= t1 else Phase.STABILIZE if t <= t2 else Phase.CONSOLIDATE


def trainable_set(phase: Phase, cfg: ScheduleConfig, dges: bool = True) -> TrainableSet:
    if phase == Phase.WARMUP:
        return TrainableSet(True, False, "all") if cfg.warmup == "fig1" else TrainableSet(True, True, "none")
    experts = "domain" if dges else "all"
    return TrainableSet(phase == Phase.STABILIZE, False, experts)


def apply(train: Trainability, tset: TrainableSet, num_blocks: int,
          domain_experts: Optional[Sequence[Sequence[int]]] = None) -> None:
    """Make exactly ``tset`` trainable; ``domain_experts[b]`` = S_d of block b when experts == "domain"."""
    train.set_part(ROUTER_PART, tset.router)
    if BACKBONE_PART in train.parts:
        train.set_part(BACKBONE_PART, tset.backbone)
    if tset.experts == "domain":
        if domain_experts is None:
            raise ValueError("the phase trains the domain's experts, but no expert sets were given")
        for b in range(num_blocks):
            train.set_experts(b, domain_experts[b])
    else:
        train.set_all_experts(tset.experts == "all")
