"""Token dispatch: tokens -> their experts (across EP ranks) -> weighted combine.

Sort-based and exact-size: routes are sorted by expert, each expert runs one
GEMM chain on its contiguous slice, and only routed tokens are computed (no
capacity padding).  With ``ep_size > 1`` the slices travel with DeepSpeed's
communication layer (``deepspeed.comm.all_to_all_single`` with per-rank split
sizes) over the expert-parallel group DeepSpeed created for the layer.

Capacity: ``capacity_factor=None`` is dropless.  Otherwise each expert keeps at
most ``max(min_capacity, ceil(k * S / E * capacity_factor))`` routes from this
rank; first choices of all tokens win over second choices, then earlier tokens
win (the GShard/DeepSpeed top-2 priority).  Dropped routes contribute zero.

Weight-gradient mask: ``forward(..., keep=[S, k] bool)`` marks routes that must
not contribute to their expert's weight gradients (their output, input gradient
and route-weight gradient are unchanged).  The mask is sorted and shipped with
the rows, so it holds whichever rank runs the expert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import deepspeed.comm as dist
import torch
from torch import Tensor, nn
from torch.func import functional_call

from desmoe.moe.experts import SwiGLUExpert
from desmoe.moe.grouped import fuses_rows, grouped_swiglu
from desmoe.moe.layout import ExpertLayout
from desmoe.moe.permutation import RoutePlan, permute, unpermute
from desmoe.moe.router import Routing


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with explicit split sizes; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _AllToAllV.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


@dataclass
class DispatchStats:
    tokens_per_expert: Tensor  # [E] routes per global expert from this rank, before drops
    dropped: Tensor  # scalar, routes dropped by capacity on this rank


class ExpertDispatcher(nn.Module):
    def __init__(
        self,
        experts: nn.Module,
        layout: ExpertLayout,
        capacity_factor: Optional[float] = None,
        eval_capacity_factor: Optional[float] = None,
        min_capacity: int = 4,
    ) -> None:
        super().__init__()
        # Attribute name `experts` (holding DeepSpeed's `Experts`) is what DeepSpeed's
        # checkpointing looks for under `deepspeed_moe.experts.deepspeed_experts.<i>`.
        self.experts = experts
        self.layout = layout
        self.num_routed = layout.num_experts  # router outputs; capacity stays per routed expert with spare slots
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.ep_group = None
        self.ep_rank = 0

    def _set_ep_group(self, group) -> None:  # called by DeepSpeed's MoE._create_process_groups
        self.ep_group = group
        self.ep_rank = dist.get_rank(group=group) if self.layout.ep_size > 1 else 0

    def capacity(self, num_tokens: int, k: int) -> Optional[int]:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None or factor <= 0:
            return None
        return max(self.min_capacity, math.ceil(k * num_tokens / self.num_routed * factor))

    def forward(self, x: Tensor, routing: Routing, keep: Optional[Tensor] = None,
                slots: Optional[Tensor] = None) -> tuple[Tensor, DispatchStats]:
        """``slots`` [S, k]: the expert slot each route runs on (default: the chosen expert)."""
        num_tokens, k = routing.expert_ids.shape
        num_experts = self.layout.num_experts
        # Routes in priority order: all first choices, then all second choices, ...
        route_expert = (routing.expert_ids if slots is None else slots).t().reshape(-1)
        route_weight = routing.weights.t().reshape(-1)
        order = torch.argsort(route_expert, stable=True)
        # scatter_add, not bincount: CUDA's bincount reads the largest id back to the host.
        counts = torch.zeros(num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, route_expert, torch.ones_like(route_expert))
        capacity = self.capacity(num_tokens, k)
        if capacity is not None:
            sorted_expert = route_expert[order]
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(order.numel(), device=order.device) - starts[sorted_expert]
            order = order[slot < capacity]
            kept_counts = counts.clamp(max=capacity)
        else:
            kept_counts = counts
        plan = RoutePlan(order, num_tokens, k)
        weights = route_weight[order]
        route_keep = None if keep is None else keep.t().reshape(-1)[order]
        experts = self.experts.deepspeed_experts
        if self.layout.ep_size == 1 and self._grouped() and fuses_rows(x, experts):
            # Token mode: the experts gather their rows from x and sum their outputs into token order
            # themselves (the CPU loop one expert at a time, while the rows are in cache), and keep x once
            # instead of its k gathered copies; the route weight goes inside the activation.
            out = grouped_swiglu(x, kept_counts, experts, weights.to(x.dtype), route_keep,
                                 token_of_row=plan.token_of_route)
        else:
            dispatched = permute(x, plan)  # [N, d] grouped by expert
            if self._grouped():
                # The route weights go with their rows (to other ranks with EP) into the experts' fused
                # activation: no fp32 copy of the returned rows kept for backward.  (With EP = 1 this is the
                # loop backend, which reads the counts on the host anyway: grouped_mm takes token mode.)
                weighted = self._run_experts(dispatched, kept_counts, route_keep, weights.to(dispatched.dtype))
            else:
                weighted = self._run_experts(dispatched, kept_counts, route_keep).float() * weights.unsqueeze(1)
            out = unpermute(weighted, plan, x.dtype)  # each token's routes summed in fp32
        stats = DispatchStats(tokens_per_expert=counts.detach(), dropped=(counts - kept_counts).sum().detach())
        return out, stats

    def _run_experts(self, dispatched: Tensor, counts: Tensor, keep: Optional[Tensor] = None,
                     route_w: Optional[Tensor] = None) -> Tensor:
        """Run the local experts; with EP, ship each slice to the rank owning its expert.  ``route_w`` (grouped
        SwiGLU experts only): each row's route weight, applied in the experts' activation (it travels with its
        row, and its gradient back)."""
        ep, nl = self.layout.ep_size, self.layout.num_local
        if ep == 1:
            return self._local_experts(dispatched, counts.tolist(), keep, route_w)
        # How many rows each rank sends to each of the receiver's local experts.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.ep_group)
        recv_matrix = recv_counts.view(ep, nl)  # [source rank, local expert]
        # The split sizes must be on the host (all_to_all_single takes lists): one read-back for all of them;
        # every other size below is derived from it, so the device is waited for once here.
        host = torch.cat([counts.view(ep, nl).sum(1), recv_counts]).tolist()
        send_splits, recv_host = host[:ep], [host[ep + r * nl: ep + (r + 1) * nl] for r in range(ep)]
        recv_splits = [sum(row) for row in recv_host]
        received = _AllToAllV.apply(dispatched, send_splits, recv_splits, self.ep_group)
        # Received rows are source-major; the experts want expert-major slices.  (output_size: without it
        # CUDA's repeat_interleave reads the total back from the device.)
        segment = torch.repeat_interleave(torch.arange(ep * nl, device=counts.device), recv_matrix.reshape(-1),
                                          output_size=sum(recv_splits))
        expert_major = torch.argsort((segment % nl) * ep + segment // nl, stable=True)
        if keep is not None:  # the mask travels with its rows (same splits, no gradient)
            keep_recv = keep.new_empty(sum(recv_splits), dtype=torch.uint8)
            dist.all_to_all_single(keep_recv, keep.to(torch.uint8).contiguous(), output_split_sizes=recv_splits,
                                   input_split_sizes=send_splits, group=self.ep_group)
            keep = keep_recv.bool().index_select(0, expert_major)
        if route_w is not None:
            route_w = _AllToAllV.apply(route_w, send_splits, recv_splits, self.ep_group).index_select(0, expert_major)
        local_out = self._local_experts(received.index_select(0, expert_major), [sum(c) for c in zip(*recv_host)],
                                        keep, route_w)
        restored = local_out.index_select(0, torch.argsort(expert_major))
        return _AllToAllV.apply(restored, recv_splits, send_splits, self.ep_group)

    def _grouped(self) -> bool:
        return all(type(e) is SwiGLUExpert for e in self.experts.deepspeed_experts)

    def _local_experts(self, rows: Tensor, counts: list[int], keep: Optional[Tensor] = None,
                       route_w: Optional[Tensor] = None) -> Tensor:
        experts = self.experts.deepspeed_experts
        if self._grouped():
            return grouped_swiglu(rows, counts, experts, route_w, keep=keep)
        if route_w is not None:
            raise ValueError("route weights inside the experts need grouped SwiGLU experts")
        # split (not slicing): its backward is one concat, where slices would each
        # materialise a full-size zero gradient.  Empty slices still run so every
        # expert parameter gets a (zero) gradient.
        slices = rows.split(counts, dim=0)
        if keep is None:
            return torch.cat([expert(part) for expert, part in zip(experts, slices)], dim=0)
        return torch.cat([_masked_call(expert, part, k) for expert, part, k
                          in zip(experts, slices, keep.split(counts))], dim=0)


def _masked_call(expert: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """Any expert module with a weight-gradient row mask: masked rows run on detached
    parameters (input gradient intact, no weight gradient).  Costs a second forward of the
    expert; the grouped SwiGLU path does it inside its backward instead."""
    frozen = {name: p.detach() for name, p in expert.named_parameters()}
    return torch.where(keep.unsqueeze(1), expert(x), functional_call(expert, frozen, (x,)))
