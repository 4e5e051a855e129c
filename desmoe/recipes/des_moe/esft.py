"""ESFT baselines (Wang et al. 2024): score experts on a domain's routing log, train the top ones.

Per MoE layer, over the profiled tokens of a domain (teacher-forced forwards of the
base model; which positions count is ``desmoe.routing_stats_tokens``: by default, with
instruction data, only those whose label is in the loss; "all" counts the prompt tokens
too, as the ESFT code does; text-only data counts every token either way):

* ESFT-Gate  : g_e = mean over tokens of the gate value of e (its softmax score if e
               is in the token's top-K, else 0; not renormalised);
* ESFT-Token : r_e = mean over tokens of 1(e in top-K) / K   (sums to 1 per layer).

Selection keeps, per layer, the shortest prefix of experts sorted by score whose
sum reaches p (the expert that crosses p is included): p = 0.1 (Gate), 0.2 (Token).
Only the selected routed experts train; router, backbone and shared experts stay frozen.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from desmoe.moe import moe_blocks


class RoutingProfile:
    """Accumulates gate values and top-K counts per (layer, expert) from forwards of the model."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.gate_sum = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.count = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.tokens = 0.0
        self.k = 1

    def record(self, layer: int, routing, keep: Optional[Tensor] = None) -> None:
        """One layer's routing of a batch (a :class:`~desmoe.moe.router.Routing`); ``keep`` [S] bool
        selects the tokens counted (None: all)."""
        self.k = routing.expert_ids.shape[1]
        expert_ids, scores = routing.expert_ids, routing.scores
        if keep is not None:
            keep = keep.reshape(-1).to(expert_ids.device)
            expert_ids, scores = expert_ids[keep], scores[keep]
        ids = expert_ids.reshape(-1).cpu()
        gates = scores.gather(1, expert_ids).double().reshape(-1).cpu()  # not renormalised
        self.gate_sum[layer].index_add_(0, ids, gates)
        self.count[layer] += torch.bincount(ids, minlength=self.count.shape[1]).double()
        if layer == 0:
            self.tokens += float(expert_ids.shape[0])

    def record_model(self, model: nn.Module, keep: Optional[Tensor] = None) -> None:
        """The last forward of every MoE block; ``keep`` as in :meth:`record` (e.g. from
        ``dges.counted_positions``)."""
        for layer, block in enumerate(moe_blocks(model)):
            self.record(layer, block.last_routing, keep)

    def all_reduce(self, group=None) -> None:
        from desmoe.collectives import all_reduce_, is_distributed

        if is_distributed(group):
            packed = all_reduce_(torch.cat([self.gate_sum.reshape(-1), self.count.reshape(-1),
                                            torch.tensor([self.tokens], dtype=torch.float64)]), group=group)
            n = self.gate_sum.numel()
            self.gate_sum = packed[:n].view_as(self.gate_sum)
            self.count = packed[n:2 * n].view_as(self.count)
            self.tokens = float(packed[-1])

    def gate_scores(self) -> Tensor:
        return self.gate_sum / max(self.tokens, 1.0)

    def token_scores(self) -> Tensor:
        return self.count / max(self.tokens * self.k, 1.0)


def select_top_p(scores: Tensor, p: float) -> list[int]:
    """Shortest prefix of experts by descending score whose sum reaches p."""
    chosen, total = [], 0.0
    for e in torch.argsort(scores, descending=True, stable=True).tolist():
        if total >= p:
            break
        chosen.append(e)
        total += float(scores[e])
    return sorted(chosen)


def select_experts(profile: RoutingProfile, kind: str, p: float) -> list[list[int]]:
    """Per layer, the experts ESFT-``kind`` ("token" or "gate") trains."""
    scores = profile.token_scores() if kind == "token" else profile.gate_scores()
    return [select_top_p(row, p) for row in scores]
