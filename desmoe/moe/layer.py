"""The MoE block: router -> dispatcher/experts (+ always-on shared experts).

``MoEBlock`` *is* a ``deepspeed.moe.layer.MoE`` so DeepSpeed treats it as one of
its own: it creates the expert-parallel / expert-data-parallel process groups,
reduces expert gradients over the expert-data-parallel group under ZeRO, and
writes one checkpoint file per (layer, global expert) that reloads at another
``ep_size``.  What runs inside is ours: a pluggable :class:`Router` and the
exact-size :class:`ExpertDispatcher` (DeepSpeed's own gate fixes softmax +
forced top-k renormalisation and pads every expert to a capacity).

Naming rule inherited from DeepSpeed's checkpointing: inside this module only
the routed experts may have "expert" in their parameter names.
"""
from __future__ import annotations

from typing import Optional

import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from desmoe.kernels import keep_freed_heap
from desmoe.moe.device_copies import DeviceCopies
from desmoe.moe.dispatcher import DispatchStats, ExpertDispatcher
from desmoe.moe.experts import InitMode, init_local_experts
from desmoe.moe.layout import ExpertLayout
from desmoe.moe.router import Router, Routing, load_balancing_loss, route_counts


class MoEBlock(MoE):
    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        router: Router,
        ep_size: int = 1,
        capacity_factor: Optional[float] = None,
        eval_capacity_factor: Optional[float] = None,
        min_capacity: int = 4,
        shared: Optional[nn.Module] = None,
        shared_gate: bool = False,
        route_per_sequence: bool = False,
    ) -> None:
        # DeepSpeed's MoE.__init__ would build its own TopKGate/MOELayer; we only need the
        # attributes its engine reads, so initialise as a plain module and set them here.
        nn.Module.__init__(self)
        # Every step frees and re-allocates the experts' gradient and activation buffers: let malloc keep
        # them instead of page-faulting them back in each step (desmoe.kernels.keep_freed_heap).
        keep_freed_heap()
        self.layout = ExpertLayout(router.num_experts, ep_size)
        self.hidden_size = hidden_size
        self.num_experts = router.num_experts
        self.ep_size = ep_size
        self.num_local_experts = self.layout.num_local
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.router = router
        experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = ExpertDispatcher(experts, self.layout, capacity_factor, eval_capacity_factor, min_capacity)
        self.shared = shared
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if (shared is not None and shared_gate) else None
        # Per-sequence routing: the router sees only the first token of each sequence of
        # a [B, L, d] input and its decision holds for every token of that sequence
        # (sample-level routing on a CLS/BOS token, as in adapter mixtures).
        self.route_per_sequence = route_per_sequence
        # Optional [S, E] bool over (flattened token, expert), set by a caller before a forward:
        # False = that route adds nothing to the expert's weight gradients (its output, the input
        # gradient and the router gradient are unchanged).  Read only when gradients are enabled.
        self.weight_grad_mask: Optional[Tensor] = None
        # Expert slots (desmoe.moe.slots): the slot each router output runs on (None = itself), an
        # optional [S, E] per-(token, expert) override for one forward, and an optional [E, R] fan-out
        # (used when no override is set): a route to e runs on every slot of row e (-1 = padding) with
        # its weight split equally, i.e. the mean of those slots' outputs.
        self.slot_of_expert: Optional[Tensor] = None
        self.route_slots: Optional[Tensor] = None
        self.slot_fanout: Optional[Tensor] = None
        self._device_copies = DeviceCopies()  # of slot_of_expert / slot_fanout, set on the host
        # Filled by every forward, for losses and monitoring.
        self.last_routing: Optional[Routing] = None
        self.last_stats: Optional[DispatchStats] = None
        self.aux_loss: Tensor = torch.zeros(())
        # Routes per router output since the last update_selection_biases (training forwards of a
        # router that asked for bias updates only).
        self.pending_load: Optional[Tensor] = None

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_rank(self) -> int:
        return self.deepspeed_moe.ep_rank

    def local_global_ids(self) -> range:
        return self.layout.local_global_ids(self.ep_rank)

    def init_experts(self, seed: int, mode: InitMode = "independent") -> None:
        """(Re)initialise the local experts by global id; needs the EP group to be set
        when ``ep_size > 1`` (call after ``set_deepspeed_parallelism``)."""
        init_local_experts(self.local_experts, self.layout, self.ep_rank, seed, mode)

    def forward(self, hidden_states: Tensor) -> Tensor:  # type: ignore[override]
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.route_per_sequence:
            if hidden_states.dim() != 3:
                raise ValueError(f"per-sequence routing needs [B, L, d] input, got {tuple(shape)}")
            routing = _repeat_routing(self.router(hidden_states[:, 0]), shape[1])
        else:
            routing = self.router(x)
        keep = self._route_keep(routing)  # None unless a caller set weight_grad_mask
        if self.slot_fanout is not None and self.route_slots is None:
            fanout = self._device_copies.get("fanout", self.slot_fanout, x.device)
            wide, wide_keep, slots = _fan_out(routing, keep, fanout)
            out, stats = self.deepspeed_moe(x, wide, wide_keep, slots)
        else:
            out, stats = self.deepspeed_moe(x, routing, keep, self._slots(routing))
        if self.shared is not None:
            shared_out = self.shared(x)
            if self.shared_gate is not None:
                shared_out = torch.sigmoid(self.shared_gate(x)) * shared_out
            out = out + shared_out
        self.last_routing, self.last_stats = routing, stats
        if self.training and getattr(self.router, "bias_update_rate", 0.0):
            with torch.no_grad():
                load = route_counts(routing.expert_ids, self.router.num_experts).float()  # no host sync
                self.pending_load = load if self.pending_load is None else self.pending_load + load
        self.aux_loss = load_balancing_loss(routing.scores, routing.expert_ids, self.router.num_experts)
        return out.reshape(shape)

    def _route_keep(self, routing: Routing) -> Optional[Tensor]:
        """[S, k] bool per route from ``weight_grad_mask`` (no backward, no mask needed)."""
        if self.weight_grad_mask is None or not torch.is_grad_enabled():
            return None
        if self.weight_grad_mask.shape != routing.scores.shape:
            raise ValueError(f"weight_grad_mask must be [tokens, experts] = {tuple(routing.scores.shape)}, "
                             f"got {tuple(self.weight_grad_mask.shape)}")
        mask = self.weight_grad_mask.to(device=routing.expert_ids.device, dtype=torch.bool)
        return mask.gather(1, routing.expert_ids)

    def _slots(self, routing: Routing) -> Optional[Tensor]:
        if self.route_slots is not None:
            if self.route_slots.shape != routing.scores.shape:
                raise ValueError(f"route_slots must be [tokens, experts] = {tuple(routing.scores.shape)}, "
                                 f"got {tuple(self.route_slots.shape)}")
            return self.route_slots.to(routing.expert_ids.device).gather(1, routing.expert_ids)
        if self.slot_of_expert is not None:
            slot_of = self._device_copies.get("slot_of_expert", self.slot_of_expert, routing.expert_ids.device)
            return slot_of[routing.expert_ids]
        return None


def _fan_out(routing: Routing, keep: Optional[Tensor], fanout: Tensor) -> tuple:
    """Each route (i, e, w) -> routes (i, s, w / n_e) for the n_e slots s of fanout[e]; padding
    entries run the first slot with weight 0 (they add nothing)."""
    table = fanout[routing.expert_ids]  # [S, k, R]
    valid = table >= 0
    share = valid.sum(-1, keepdim=True).clamp_min(1)
    slots = torch.where(valid, table, table[..., :1]).flatten(1)
    weights = (routing.weights.unsqueeze(-1) * valid / share).flatten(1)
    wide = Routing(logits=routing.logits, scores=routing.scores, weights=weights,
                   expert_ids=routing.expert_ids.repeat_interleave(table.shape[-1], dim=1))
    wide_keep = None if keep is None else keep.repeat_interleave(table.shape[-1], dim=1)
    return wide, wide_keep, slots


def _repeat_routing(routing: Routing, times: int) -> Routing:
    """Sequence-level routing [B, ...] -> token-level [B * times, ...] (sequence-major)."""
    rep = lambda t: t.repeat_interleave(times, dim=0)  # noqa: E731
    return Routing(logits=rep(routing.logits), scores=rep(routing.scores),
                   expert_ids=rep(routing.expert_ids), weights=rep(routing.weights))


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All MoE blocks of a model in module order (= DeepSpeed's moe_layer_id order)."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def total_aux_loss(model: nn.Module) -> Tensor:
    blocks = moe_blocks(model)
    return torch.stack([b.aux_loss for b in blocks]).mean() if blocks else torch.zeros(())


@torch.no_grad()
def update_selection_biases(model: nn.Module, group=None) -> int:
    """One auxiliary-loss-free balancing step for every router with ``bias_update_rate``: the loads
    gathered since the last call are summed over ``group`` (all ranks; one collective for all
    layers) so every rank applies the same step.  Call it on every rank after each optimizer step.
    Under activation checkpointing the loads are the forward's alone (desmoe/recompute.py drops what
    the backward's recompute records).  Returns the number of routers updated."""
    from desmoe.collectives import all_reduce_

    blocks = [b for b in moe_blocks(model) if getattr(b.router, "bias_update_rate", 0.0)]
    if not blocks:
        return 0
    device = blocks[0].router.selection_bias.device
    loads = torch.stack([b.pending_load.to(device) if b.pending_load is not None
                         else torch.zeros(b.router.num_experts, device=device) for b in blocks])
    all_reduce_(loads, group=group)  # NCCL reduces device tensors only: the helper handles any device
    for block, load in zip(blocks, loads):
        block.router.update_selection_bias(load)
        block.pending_load = None
    return len(blocks)


def global_tokens_per_expert(model: nn.Module, group=None) -> Tensor:
    """[layers, E] routes per expert summed over all ranks (one collective for all layers)."""
    from desmoe.collectives import all_reduce_

    counts = torch.stack([b.last_stats.tokens_per_expert for b in moe_blocks(model)]).clone()
    all_reduce_(counts, group=group)
    return counts
