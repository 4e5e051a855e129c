"""Expert groups on the MoE core: one group of N_g adapter experts per task.

Every adapted site of the model (a transformer block, a residual block on CNN
features) holds one :class:`~desmoe.moe.MoEBlock` whose T * N_g experts are
pre-allocated and split into named layout groups ``task0 .. task{T-1}``
(``ExpertLayout.define_group``).  Group sizes are fixed at construction and
never change; with ``ep_size > 1`` DeepSpeed's expert parallelism places the
groups on different ranks (contiguous ids: the first half of the tasks on EP rank
0, ...).  Pre-allocation is deliberate: ZeRO fixes its optimizer partitions at
start-up, and the per-step cost then does not depend on how many tasks are done.

Training task t makes exactly group t's experts and gate trainable
(:class:`~desmoe.moe.trainability.Trainability`); every other group is frozen
bit-identically by ``FreezableAdamW``.  Since a group is only ever frozen whole,
its experts in every block share one optimizer group (:func:`group_unit`): about
T x 2 expert groups instead of blocks x T x N_g, which ZeRO steps much faster.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from desmoe.moe.experts import AdapterExpert
from desmoe.moe.layer import MoEBlock, moe_blocks
from desmoe.recipes.trge.intra_group import GroupContext, GroupRouter


@dataclass
class GroupSpec:
    num_tasks: int = 3
    experts_per_group: int = 2  # N_g, the same for every task
    top_k: int = 2  # intra-group top-k
    bottleneck: int = 64  # MoE-Adapters ffn_num
    scale: float = 0.1  # MoE-Adapters adapter_scalar
    max_groups: int = 2  # groups one sample may use at once (bounds the routed work)
    noisy: bool = True  # noisy top-k gate in training
    ep_size: int = 1
    # groups (TRGE) | pool (the MoE-Adapters-style baseline) | "" (unset: the method's own, set by the recipe)
    layout: str = ""
    pool_freeze_per_task: int = 2  # pool: most-used experts frozen per block after each task

    def check(self) -> None:
        from desmoe.config import bad

        if self.num_tasks < 0:
            raise bad("num_tasks", "an integer >= 1 (0 = one group per task of the sequence)", self.num_tasks)
        if self.layout not in ("", "groups", "pool"):
            raise bad("layout", "groups or pool (or unset: the method's own)", self.layout)
        if self.experts_per_group < 1:
            raise bad("experts_per_group", "an integer >= 1", self.experts_per_group)
        if not 1 <= self.top_k <= self.experts_per_group:
            raise bad("top_k", f"an integer in [1, experts_per_group={self.experts_per_group}]", self.top_k)
        if self.max_groups < 1:
            raise bad("max_groups", "an integer >= 1", self.max_groups)
        if self.ep_size < 1:  # checked before it divides anything below and in the recipe's set-up
            raise bad("ep_size", "an integer >= 1", self.ep_size)
        if self.bottleneck < 1:
            raise bad("bottleneck", "an integer >= 1", self.bottleneck)
        if self.pool_freeze_per_task < 0:  # a negative count would slice off all but a few experts
            raise bad("pool_freeze_per_task", "an integer >= 0", self.pool_freeze_per_task)
        if self.num_tasks and (self.num_tasks * self.experts_per_group) % self.ep_size:
            raise bad("ep_size", f"a divisor of num_tasks * experts_per_group = "
                                 f"{self.num_tasks * self.experts_per_group}", self.ep_size)

    @property
    def num_experts(self) -> int:
        return self.num_tasks * self.experts_per_group


def group_name(task: int) -> str:
    return f"task{task}"


def gate_part(task: int) -> str:
    return f"gate{task}"


def build_group_block(hidden_size: int, spec: GroupSpec, context: GroupContext) -> MoEBlock:
    if spec.layout == "pool":
        from desmoe.recipes.trge.baselines import PoolRouter

        router = PoolRouter(hidden_size, spec.num_tasks, spec.num_experts, spec.top_k, context, noisy=spec.noisy)
        return MoEBlock(hidden_size, AdapterExpert(hidden_size, spec.bottleneck, spec.scale), router,
                        ep_size=spec.ep_size, route_per_sequence=True)
    router = GroupRouter(hidden_size, spec.num_tasks, spec.experts_per_group, spec.top_k, context,
                         max_groups=spec.max_groups, noisy=spec.noisy)
    block = MoEBlock(hidden_size, AdapterExpert(hidden_size, spec.bottleneck, spec.scale), router,
                     ep_size=spec.ep_size, route_per_sequence=True)
    n = spec.experts_per_group
    for t in range(spec.num_tasks):
        block.layout.define_group(group_name(t), range(t * n, (t + 1) * n))
    return block


def gate_parts(num_tasks: int) -> dict:
    """Optimizer parts: each task's gates (in every block) form one freezable part."""
    return {gate_part(t): (lambda name, t=t: f".gates.{t}." in name) for t in range(num_tasks)}


def setup_groups(model: nn.Module, seed: int) -> None:
    """Join DeepSpeed's EP groups and draw every expert by its global id (EP-independent)."""
    for i, block in enumerate(moe_blocks(model)):
        if block.ep_size > 1:
            block.set_deepspeed_parallelism()
        block.init_experts(seed=seed * 1000 + i)


def group_unit(model: nn.Module):
    """``expert_unit`` for :func:`~desmoe.engine.build_engine`: an expert's task group, the same
    in every block; an expert in no group (the pool layout of shared_pool) is its own unit."""
    layouts = [block.layout for block in moe_blocks(model)]

    def unit(block: int, expert: int):
        names = layouts[block].groups_of(expert)
        return names[0] if names else (block, expert)

    return unit


def train_only_group(trainability, model: nn.Module, task: int) -> None:
    """Exactly group ``task`` (experts + gate) may move; all others stay bit-identical."""
    trainability.set_expert_blocks({b: block.layout.group(group_name(task))
                                    for b, block in enumerate(moe_blocks(model))})
    for part in trainability.parts:
        if part.startswith("gate"):
            trainability.set_part(part, part == gate_part(task))
