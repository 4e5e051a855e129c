"""Intra-group router: one noisy top-k gate per task group, mixed by inter-group weights.

A block's experts are T groups of N_g (group j owns global experts
j*N_g .. j*N_g+N_g-1).  For a sample with inter-group weights w [T] (set by the
caller on the shared :class:`GroupContext` before the forward), the router

1. keeps the groups with w_j > 0, at most ``max_groups`` of them (largest first),
   so the routed work per sample never grows with the number of groups;
2. inside each kept group j computes the MoE-Adapters gate on the sample's
   first token c:  logits = c R_j (+ eps * (softplus(c W_j) + 1e-2) in training),
   softmax over the top-k logits, zero elsewhere;
3. routes to the k chosen experts of every kept group with weight w_j * g_{j,i}.

Gates are zero-initialised (as MoE-Adapters): a new group starts uniform.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.moe.router import Router, Routing
from desmoe.moe.tensor_memo import TensorMemo


class GroupContext(nn.Module):
    """Per-forward routing state shared by all adapted blocks of one tower.

    A module without parameters or buffers (no state_dict entries) so that it is part of every block that
    reads it: the model sets the weights for one forward and clears them right after, and
    ``train.activation_checkpointing`` (desmoe/recompute.py) replays the attributes of a layer's modules in
    the backward's recompute -- as a plain object it would see None there and skip the adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.group_weights: Optional[Tensor] = None  # [B, T]; None = adapters off (frozen model)
        # set while an accumulated step's micro-batch runs (accumulate.StepDraws.image_noise): the gates'
        # noise rows come from the whole step's draw; None = a fresh draw of the forward's own shape
        self.draw_noise: Optional[Callable[[nn.Module, Tensor], Tensor]] = None
        # the most groups with weight > 0 in one row, memoised on the weights: the count sizes every router's
        # top-k, and reading it waits for the device; a tower's layers (and every step of a training stage,
        # which reuses one weight tensor) share one read.  Replaced, never changed in place, so a recompute's
        # snapshot of this module's attributes stays consistent.
        self._active_groups: Optional[TensorMemo] = None

    @property
    def active(self) -> bool:
        return self.group_weights is not None

    def most_active_groups(self) -> int:
        """The most groups with weight > 0 in one row of ``group_weights``; read from the device once per
        weight tensor and version (an in-place change of the weights is a new version: read again)."""
        source, memo = self.group_weights, self._active_groups
        if memo is not None and memo.fresh(source):
            return memo.value
        count = int((source.float() > 0).sum(1).max().item())  # as the router casts them
        entry = TensorMemo.of(source, count)
        if entry is not None:  # an inference tensor (no version counter) is read every time
            self._active_groups = entry
        return count

    def noise(self, owner: nn.Module, like: Tensor) -> Tensor:
        """Standard-normal gate noise of ``like``'s shape for the router ``owner``."""
        return torch.randn_like(like) if self.draw_noise is None else self.draw_noise(owner, like)


class TaskGate(nn.Module):
    """R_j and the noise projection W_j of one group (names avoid "expert": DeepSpeed's rule)."""

    def __init__(self, hidden_size: int, group_size: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(hidden_size, group_size))
        self.w_noise = nn.Parameter(torch.zeros(hidden_size, group_size))


class GroupRouter(Router):
    def __init__(self, hidden_size: int, num_groups: int, group_size: int, k: int, context: GroupContext,
                 max_groups: int = 2, noisy: bool = True) -> None:
        if not 1 <= k <= group_size:
            raise ValueError(f"intra-group top-k must be in [1, {group_size}], got {k}")
        super().__init__(num_groups * group_size, k)
        self.num_groups, self.group_size, self.k_intra = num_groups, group_size, k
        self.max_groups, self.noisy = max_groups, noisy
        self.gates = nn.ModuleList(TaskGate(hidden_size, group_size) for _ in range(num_groups))
        self.context = context

    def gate_logits(self, x: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        """Clean and (in training) noisy logits [S, m, N_g] of the gates ``groups`` [S, m]."""
        w = torch.stack([g.w_gate for g in self.gates]).float()  # [T, d, N_g]; tiny
        xf = x.float()
        clean = torch.einsum("sd,smdn->smn", xf, w[groups])
        if not (self.training and self.noisy):
            return clean, clean
        wn = torch.stack([g.w_noise for g in self.gates]).float()
        std = F.softplus(torch.einsum("sd,smdn->smn", xf, wn[groups])) + 1e-2
        return clean, clean + self.context.noise(self, clean) * std

    def forward(self, x: Tensor) -> Routing:  # x: [S, d], one row per sample
        weights = self.context.group_weights
        if weights is None or weights.shape != (x.shape[0], self.num_groups):
            got = None if weights is None else tuple(weights.shape)
            raise ValueError(f"group weights must be [{x.shape[0]}, {self.num_groups}], got {got}")
        weights = weights.to(x.device, torch.float32)
        m = max(min(self.max_groups, self.context.most_active_groups()), 1)
        group_w, groups = torch.topk(weights, m, dim=1)  # [S, m]
        clean, noisy = self.gate_logits(x, groups)
        top_logit, top_idx = torch.topk(noisy, self.k_intra, dim=-1)  # [S, m, k]
        gate = top_logit.softmax(-1) * group_w.unsqueeze(-1)
        expert_ids = (groups.unsqueeze(-1) * self.group_size + top_idx).reshape(x.shape[0], -1)
        gate = gate.reshape(x.shape[0], -1)
        # Dense views over all experts for monitoring (clean logits of the kept groups).
        dense_ids = (groups.unsqueeze(-1) * self.group_size + torch.arange(self.group_size, device=x.device))
        logits = x.new_full((x.shape[0], self.num_experts), float("-inf"), dtype=torch.float32)
        logits = logits.scatter(1, dense_ids.reshape(x.shape[0], -1), clean.reshape(x.shape[0], -1))
        scores = torch.zeros_like(logits).scatter_add(1, expert_ids, gate)
        return Routing(logits=logits, scores=scores, expert_ids=expert_ids, weights=gate)
