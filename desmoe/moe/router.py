"""Routers: token -> (top-k experts, combine weights), plus the fp32 logits.

A router only has to say how it computes logits (:meth:`Router.compute_logits`);
scoring, noise, top-k selection and weight normalisation are shared here so that
every router built on this base (the linear one here, or any learned router a
method defines in its own package) obeys the same conventions:

* logits are computed in fp32 and kept *before* any noise (auxiliary and
  distillation losses must see the deterministic function);
* optionally, top-k is group-limited: experts form ``num_groups`` equal
  consecutive groups, each scored by its best expert (``group_score="max"``) or
  by the sum of its best two (``"top2_sum"``), and only the best
  ``topk_groups`` groups may be chosen (device-limited routing);
* scores are a softmax (or sigmoid) over **all** experts; top-k picks from the
  (optionally noised) scores, plus an optional per-expert ``selection_bias``
  buffer that changes *which* experts win but never their weights (auxiliary-
  loss-free balancing, see :meth:`Router.update_selection_bias`); combine weights
  are the selected scores, optionally renormalised to sum to 1 (for every k:
  top-1 renormalised is a weight of exactly 1) and scaled by a constant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ScoreFunc = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]
NoisePolicy = Literal["none", "jitter", "gaussian"]


@dataclass
class Routing:
    """What a router decided for one flattened batch of S tokens."""

    logits: Tensor  # [S, E] fp32, before noise
    scores: Tensor  # [S, E] fp32, softmax/sigmoid over all experts (no noise)
    expert_ids: Tensor  # [S, k] int64, chosen experts (first column = first choice)
    weights: Tensor  # [S, k] fp32 combine weights

    @property
    def k(self) -> int:
        return self.expert_ids.shape[1]


class Router(nn.Module):
    """Base class: subclasses implement ``compute_logits(x) -> [S, E]``."""

    def __init__(
        self,
        num_experts: int,
        k: int,
        score_func: ScoreFunc = "softmax",
        normalize_topk: bool = True,
        scaling: float = 1.0,
        noise: NoisePolicy = "none",
        noise_eps: float = 1e-2,
        num_groups: int = 1,
        topk_groups: int = 1,
        group_score: GroupScore = "max",
        selection_bias: bool = False,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"top-k must be in [1, {num_experts}], got {k}")
        if num_groups > 1 and (num_experts % num_groups or not 1 <= topk_groups <= num_groups
                               or k > topk_groups * (num_experts // num_groups)):
            raise ValueError(f"{num_groups} expert groups (top {topk_groups}) do not fit {num_experts} experts, top-{k}")
        if group_score not in ("max", "top2_sum") or (
                num_groups > 1 and group_score == "top2_sum" and num_experts // num_groups < 2):
            raise ValueError(f"group score '{group_score}' needs 'max' or 'top2_sum' with >= 2 experts per group")
        if bias_update_rate and not selection_bias:
            raise ValueError("bias_update_rate needs selection_bias=True")
        self.num_experts = num_experts
        self.k = k
        self.score_func = score_func
        self.normalize_topk = normalize_topk
        self.scaling = scaling
        self.noise = noise
        self.noise_eps = noise_eps
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        self.group_score = group_score
        # Added to the scores for selection only; a buffer (not trained by gradients, saved with
        # the model).  None when the router has no selection bias.
        self.register_buffer("selection_bias", torch.zeros(num_experts) if selection_bias else None)
        self.bias_update_rate = bias_update_rate
        # Experts a caller excludes from selection (e.g. by task); None = all allowed.
        self.allowed_experts: Optional[Tensor] = None

    def compute_logits(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def scores_from_logits(self, logits: Tensor) -> Tensor:
        if self.score_func == "softmax":
            return logits.softmax(dim=-1)
        return logits.sigmoid()

    def forward(self, x: Tensor) -> Routing:
        logits = self.compute_logits(x).float()
        scores = self.scores_from_logits(logits)
        selection = scores
        if self.training and self.noise == "gaussian":
            # Noisy top-k (Shazeer et al.): noise changes *which* experts win, not the weights.
            selection = self.scores_from_logits(logits + torch.randn_like(logits) * self.noise_eps)
        if self.selection_bias is not None:
            selection = selection + self.selection_bias.float()
        if self.allowed_experts is not None:
            selection = selection.masked_fill(~self.allowed_experts, float("-inf"))
        if self.num_groups > 1:
            selection = self._limit_groups(selection)
        _, expert_ids = torch.topk(selection, self.k, dim=-1)
        weights = scores.gather(1, expert_ids)
        if self.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return Routing(logits=logits, scores=scores, expert_ids=expert_ids, weights=weights)

    def _limit_groups(self, selection: Tensor) -> Tensor:
        grouped = selection.view(selection.shape[0], self.num_groups, -1)
        if self.group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = torch.topk(group_scores, self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(selection)

    @torch.no_grad()
    def update_selection_bias(self, load: Tensor) -> None:
        """Auxiliary-loss-free balancing step: bias_e += rate * sign(mean load - load_e).

        ``load`` [E] is the number of routes each expert received (summed over every rank that
        must keep the same bias, so all of them take the same step)."""
        if self.selection_bias is None or not self.bias_update_rate:
            return
        load = load.to(self.selection_bias.device, torch.float32)
        step = torch.sign(load.mean() - load) * self.bias_update_rate
        self.selection_bias.add_(step.to(self.selection_bias.dtype))

    def jitter(self, x: Tensor) -> Tensor:
        """Multiplicative input jitter (Switch); applied by subclasses before their matmul."""
        if self.training and self.noise == "jitter":
            return x * torch.empty_like(x).uniform_(1.0 - self.noise_eps, 1.0 + self.noise_eps)
        return x


class LinearRouter(Router):
    """The standard gate: logits = x W^T (+ b), in fp32."""

    def __init__(self, hidden_size: int, num_experts: int, k: int, bias: bool = False, **kwargs) -> None:
        super().__init__(num_experts, k, **kwargs)
        self.proj = nn.Linear(hidden_size, num_experts, bias=bias)

    def compute_logits(self, x: Tensor) -> Tensor:
        w = self.proj.weight.float()
        b = None if self.proj.bias is None else self.proj.bias.float()
        return F.linear(self.jitter(x.float()), w, b)


def load_balancing_loss(scores: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard auxiliary loss, k-hot version: E/k * sum_e P_e * f_e.

    P_e is the mean router score of expert e over the tokens, f_e the fraction of
    (token, choice) pairs sent to e before any capacity drop.  Perfectly uniform
    routing gives 1.0.  Gradients flow through ``scores`` only.
    """
    num_tokens, k = expert_ids.shape
    counts = route_counts(expert_ids, num_experts).to(scores.dtype)
    fraction = counts / (num_tokens * k)
    mean_score = scores.mean(dim=0)
    return num_experts * torch.sum(mean_score * fraction)


def route_counts(expert_ids: Tensor, num_experts: int) -> Tensor:
    """[E] int64 routes per expert.  A scatter_add, not ``bincount``: CUDA's bincount reads the largest id
    back to the host (a synchronisation in every MoE layer's forward)."""
    ids = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
