"""Per-expert (and per-part) trainability that holds under AdamW + ZeRO-2.

Zeroing gradients does not freeze a parameter under AdamW: momentum and weight
decay still move it.  Toggling ``requires_grad`` after ``deepspeed.initialize``
does nothing under ZeRO (it flattened the trainable set at start-up).  So:

* every routed expert of every MoE block gets its own optimizer parameter group
  (tagged with its block index and *global* expert id), and each named dense part
  gets one too;
* :class:`FreezableAdamW` skips a group marked ``frozen`` entirely: no moment
  update, no weight decay, no step count.  Its parameters stay bit-identical, and
  a group that is unfrozen later resumes from the moments it had.

Gradients of frozen groups are still computed and reduced (ZeRO's buckets are
fixed); only the update is withheld.  The set can change between any two steps.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from desmoe.moe.layer import moe_blocks

PART_KEY = "desmoe_part"  # dense group tag: name of the part
EXPERT_KEY = "desmoe_expert"  # expert group tag: (block index, global expert id)
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
) -> list[dict]:
    """Optimizer groups: dense parts (first matching predicate wins; the rest is
    part "other"), each split into decay / no-decay, and one group per
    (MoE block, local expert) ready for DeepSpeed's MoE group split."""
    parts = dict(parts or {})
    expert_param_ids: dict[int, tuple[int, int]] = {}
    for b, block in enumerate(moe_blocks(model)):
        for local_id, expert in enumerate(block.local_experts):
            for p in expert.parameters():
                expert_param_ids[id(p)] = (b, block.layout.global_id(block.ep_rank, local_id))
    dense: dict[tuple[str, bool], list[nn.Parameter]] = {}
    experts: dict[tuple[int, int], dict[bool, list[nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # a frozen backbone never enters the optimizer (no fp32 copy, no grads)
            continue
        decay = not no_decay(name, p)
        if id(p) in expert_param_ids:
            experts.setdefault(expert_param_ids[id(p)], {}).setdefault(decay, []).append(p)
            continue
        part = next((k for k, pred in parts.items() if pred(name)), "other")
        dense.setdefault((part, decay), []).append(p)
    groups = [
        {"name": f"{part}{'' if decay else '-nodecay'}", "params": ps, PART_KEY: part,
         "weight_decay": weight_decay if decay else 0.0}
        for (part, decay), ps in dense.items()
    ]
    for (b, g), by_decay in experts.items():
        for decay, ps in by_decay.items():
            groups.append({"name": f"moe{b}.expert{g}{'' if decay else '-nodecay'}", "params": ps,
                           EXPERT_KEY: (b, g), "weight_decay": weight_decay if decay else 0.0})
    # DeepSpeed keys its MoE regrouping by name and marks expert groups moe=True,
    # which ZeRO needs to reduce them over the expert-data-parallel group.
    split = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in split if g["params"]]


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
        keep = set(int(e) for e in trainable)
        for g in self._groups():
            tag = g.get(EXPERT_KEY)
            if tag is not None and tag[0] == block:
                g[FROZEN_KEY] = tag[1] not in keep

    def set_all_experts(self, trainable: bool) -> None:
        for g in self._groups():
            if EXPERT_KEY in g:
                g[FROZEN_KEY] = not trainable

    def set_everything(self, trainable: bool) -> None:
        for g in self._groups():
            g[FROZEN_KEY] = not trainable

    def trainable_experts(self, block: int) -> set[int]:
        return {g[EXPERT_KEY][1] for g in self._groups()
                if g.get(EXPERT_KEY, (-1,))[0] == block and not g.get(FROZEN_KEY, False)}

    def frozen_fraction(self) -> float:
        """Share of this rank's optimizer elements that the next step leaves untouched."""
        total = frozen = 0
        for g in self._groups():
            n = sum(p.numel() for p in g["params"])
            total += n
            frozen += n if g.get(FROZEN_KEY, False) else 0
        return frozen / max(total, 1)
