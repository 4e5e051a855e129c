"""Expert slots: more physical experts than the router has outputs.

The router chooses among its ``E`` *logical* experts; the block runs *physical*
slots.  By default logical expert e runs on ``block.slot_of_expert[e]``; a caller
may redirect any (token, logical expert) route to another slot for one forward
with ``block.route_slots`` ([S, E] slot ids), e.g. to give a group of tokens its
own copy of an expert.  The router, its softmax and the combine weights do not
change, so neither does the function while a copy equals its original.

``add_spare_slots`` appends the same number of spare slots to every EP rank's
local experts, so no existing expert moves between ranks (physical ids follow
DeepSpeed's ``ep_rank * num_local + local`` rule with the new ``num_local``; its
checkpoints name experts by physical id).  ``copy_slots`` copies weights from
slot to slot across EP ranks.  Call ``add_spare_slots`` before the engine is built
(the optimizer groups are made per physical slot); after ``copy_slots`` a ZeRO
optimizer must re-read its fp32 master weights.
"""
from __future__ import annotations

import copy

import torch

from desmoe.moe.layer import MoEBlock
from desmoe.moe.layout import ExpertLayout


def add_spare_slots(block: MoEBlock, per_rank: int) -> list[int]:
    """Give every EP rank ``per_rank`` extra expert slots (copies of its first expert's
    shape, not used until a caller routes to them).  Returns the spare slots' ids."""
    if per_rank < 1:
        raise ValueError(f"per_rank must be >= 1, got {per_rank}")
    ep, nl = block.ep_size, block.layout.num_local
    experts = block.deepspeed_moe.experts
    for _ in range(per_rank):
        spare = copy.deepcopy(experts.deepspeed_experts[0])
        for p in spare.parameters():  # what DeepSpeed's Experts container marks on its own experts
            p.allreduce, p.group_name = False, block.expert_group_name
        experts.deepspeed_experts.append(spare)
    new_nl = nl + per_rank
    experts.num_local_experts = block.num_local_experts = new_nl
    block.num_experts = new_nl * ep  # DeepSpeed's checkpointing reads the physical count
    block.layout = block.deepspeed_moe.layout = ExpertLayout(new_nl * ep, ep)
    logical = torch.arange(block.router.num_experts)
    block.slot_of_expert = (logical // nl) * new_nl + logical % nl
    return [r * new_nl + nl + j for r in range(ep) for j in range(per_rank)]


@torch.no_grad()
def copy_slots(block: MoEBlock, pairs: list[tuple[int, int]]) -> None:
    """Copy expert weights slot src -> slot dst for each (src, dst); the slots may live on
    different EP ranks (one sum-all-reduce over the EP group for all pairs)."""
    from desmoe.collectives import all_reduce_

    if not pairs:
        return
    local = {g: block.local_experts[i] for i, g in enumerate(block.local_global_ids())}
    template = [p for p in block.local_experts[0].parameters()]
    flat_size = sum(p.numel() for p in template)
    buf = template[0].new_zeros(len(pairs), flat_size)
    for i, (src, _) in enumerate(pairs):
        if src in local:
            buf[i] = torch.cat([p.reshape(-1) for p in local[src].parameters()])
    if block.ep_size > 1:
        all_reduce_(buf, group=block.deepspeed_moe.ep_group)  # only the owner wrote a non-zero row
    for i, (_, dst) in enumerate(pairs):
        if dst in local:
            offset = 0
            for p in local[dst].parameters():
                p.copy_(buf[i, offset:offset + p.numel()].view_as(p))
                offset += p.numel()

