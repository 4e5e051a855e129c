"""Per-expert (and per-part) trainability that holds under AdamW + ZeRO-2.

Zeroing gradients does not freeze a parameter under AdamW: momentum and weight
decay still move it.  Toggling ``requires_grad`` after ``deepspeed.initialize``
does nothing under ZeRO (it flattened the trainable set at start-up).  So:

* every routed expert of every MoE block gets its own optimizer parameter group
  (tagged with its block index and *global* expert id), and each named dense part
  gets one too.  A caller that only ever freezes experts in fixed sets passes
  ``expert_unit(block, global id) -> key``: experts with the same key share one
  group (e.g. a task's experts in every block), which can then only be frozen or
  unfrozen whole.  Fewer groups make ZeRO's step cheaper: it reduces, norms and
  flattens per group;
* :class:`FreezableAdamW` skips a group marked ``frozen`` entirely: no moment
  update, no weight decay, no step count.  Its parameters stay bit-identical, and
  a group that is unfrozen later resumes from the moments it had.

Gradients of frozen groups are still computed and reduced (ZeRO's buckets are
fixed); only the update is withheld.  The set can change between any two steps.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Mapping, Optional

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from desmoe.moe.layer import moe_blocks

PART_KEY = "desmoe_part"  # dense group tag: name of the part
EXPERT_KEY = "desmoe_experts"  # expert group tag: the (block index, global expert id) pairs it holds
UNIT_KEY = "desmoe_unit"  # expert group tag: its unit (default: the one (block, global id) it holds)
FROZEN_KEY = "frozen"


class FreezableAdamW(torch.optim.AdamW):
    """AdamW that leaves param groups with ``group["frozen"] = True`` untouched."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        hidden: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        for group in self.param_groups:
            if group.get(FROZEN_KEY, False):
                for p in group["params"]:
                    hidden.append((p, p.grad))
                    p.grad = None  # AdamW skips parameters without a gradient
        try:
            return super().step(closure)
        finally:
            for p, grad in hidden:
                p.grad = grad


def build_param_groups(
    model: nn.Module,
    parts: Optional[Mapping[str, Callable[[str], bool]]] = None,
    weight_decay: float = 0.0,
    no_decay: Callable[[str, nn.Parameter], bool] = lambda name, p: p.ndim < 2,
    expert_unit: Optional[Callable[[int, int], Hashable]] = None,
) -> list[dict]:
    """Optimizer groups: dense parts (first matching predicate wins; the rest is
    part "other"), each split into decay / no-decay, and one group per expert unit
    (default: per (MoE block, global expert id)) ready for DeepSpeed's MoE group split."""
    parts = dict(parts or {})
    unit_of = expert_unit or (lambda b, g: (b, g))
    expert_of: dict[int, tuple[int, int]] = {}
    members: dict[Hashable, list[tuple[int, int]]] = {}  # every rank's experts, so a unit split over
    for b, block in enumerate(moe_blocks(model)):        # EP ranks is still frozen only whole
        for g in range(block.num_experts):
            members.setdefault(unit_of(b, g), []).append((b, g))
        for local_id, expert in enumerate(block.local_experts):
            for p in expert.parameters():
                expert_of[id(p)] = (b, block.layout.global_id(block.ep_rank, local_id))
    dense: dict[tuple[str, bool], list[nn.Parameter]] = {}
    units: dict[Hashable, dict] = {}  # unit -> {True: params with decay, False: without}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # a frozen backbone never enters the optimizer (no fp32 copy, no grads)
            continue
        decay = not no_decay(name, p)
        if id(p) in expert_of:
            units.setdefault(unit_of(*expert_of[id(p)]), {}).setdefault(decay, []).append(p)
            continue
        part = next((k for k, pred in parts.items() if pred(name)), "other")
        dense.setdefault((part, decay), []).append(p)
    groups = [
        {"name": f"{part}{'' if decay else '-nodecay'}", "params": ps, PART_KEY: part,
         "weight_decay": weight_decay if decay else 0.0}
        for (part, decay), ps in dense.items()
    ]
    for key, unit in units.items():
        # names must be unique: DeepSpeed's MoE split below merges groups of equal name
        label = f"moe{key[0]}.expert{key[1]}" if expert_unit is None else f"experts[{key!r}]"
        for decay, ps in unit.items():  # first-seen order, as before units existed (old checkpoints load)
            groups.append({"name": f"{label}{'' if decay else '-nodecay'}", "params": ps,
                           EXPERT_KEY: tuple(members[key]), UNIT_KEY: key,
                           "weight_decay": weight_decay if decay else 0.0})
    # DeepSpeed keys its MoE regrouping by name and marks expert groups moe=True,
    # which ZeRO needs to reduce them over the expert-data-parallel group.
    split = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in split if g["params"]]


def _short(items: list, n: int = 4) -> str:
    return "[" + ", ".join(map(str, items[:n])) + (", ...]" if len(items) > n else "]")


class Trainability:
    """Says which parts and experts the next optimizer step may update."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def _groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def parts(self) -> list[str]:
        return sorted({g[PART_KEY] for g in self._groups() if PART_KEY in g})

    def set_part(self, part: str, trainable: bool) -> None:
        found = False
        for g in self._groups():
            if g.get(PART_KEY) == part:
                g[FROZEN_KEY], found = not trainable, True
        if not found:
            raise KeyError(f"no parameter part '{part}' (parts: {', '.join(self.parts)})")

    def set_experts(self, block: int, trainable: Iterable[int]) -> None:
        """Make exactly ``trainable`` (global ids) trainable in MoE block ``block``."""
        self.set_expert_blocks({block: trainable})

    def set_expert_blocks(self, trainable: Mapping[int, Iterable[int]]) -> None:
        """For every block named, make exactly its listed experts (global ids) trainable; blocks
        not named keep their state.  An expert unit (a group of several experts) changes only
        whole: a request that would leave its members in different states raises, changing nothing."""
        keep = {int(b): {int(e) for e in ids} for b, ids in trainable.items()}
        plan = []
        for g in self._groups():
            members = g.get(EXPERT_KEY)
            if members is None:
                continue
            state = {(b, e): (e not in keep[b]) if b in keep else g.get(FROZEN_KEY, False) for b, e in members}
            if len(set(state.values())) > 1:
                moving = [m for m, frozen in state.items() if not frozen]
                raise ValueError(f"expert unit {g[UNIT_KEY]!r} changes only whole, but the request would leave "
                                 f"only {_short(moving)} of its {len(members)} (block, expert) members "
                                 f"{_short(list(members))} trainable")
            plan.append((g, next(iter(state.values()))))
        for g, frozen in plan:
            g[FROZEN_KEY] = frozen

    def set_all_experts(self, trainable: bool) -> None:
        for g in self._groups():
            if EXPERT_KEY in g:
                g[FROZEN_KEY] = not trainable

    def set_everything(self, trainable: bool) -> None:
        for g in self._groups():
            g[FROZEN_KEY] = not trainable

    def trainable_experts(self, block: int) -> set[int]:
        return {e for g in self._groups() if not g.get(FROZEN_KEY, False)
                for b, e in g.get(EXPERT_KEY, ()) if b == block}

    def frozen_fraction(self) -> float:
        """Share of this rank's optimizer elements that the next step leaves untouched."""
        total = frozen = 0
        for g in self._groups():
            n = sum(p.numel() for p in g["params"])
            total += n
            frozen += n if g.get(FROZEN_KEY, False) else 0
        return frozen / max(total, 1)
