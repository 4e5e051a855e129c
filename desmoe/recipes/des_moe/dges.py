"""Domain-Guided Expert Specialization (DES-MoE Sec. 3.2).

Per MoE layer l (the paper writes one A; experts belong to one layer, so A is kept
per layer):

    A^l[d, e] = (1/N_d) #{tokens t of domain d : e in TopK(R_adapt(h_t))}     (Eq. 5)
    M^l[d, e] = A^l[d, e] >= phi * max_e' A^l[d, e']                          (Eq. 6)
    S^l_d     = {e : M^l[d, e] = 1}

Counts are gathered from the routing every training step (cheap: one bincount per
layer), summed over all ranks at each refresh (one all-reduce for all layers), and
turned into A.  The first refresh (end of warm-up) sets A; later ones, every
``update_every`` steps, blend the new window in with momentum (Eq. 9).  A domain
row with no tokens at all gets an empty S_d (its batches then update no expert).
Which tokens count is ``desmoe.routing_stats_tokens`` (``stats_token_domain``): with instruction
data, by default only the positions whose label is in the loss (docs/desmoe.md).

Updates of a domain's batch reach only S_d (Eq. 7): the trainer makes exactly the
experts of S_d trainable in the optimizer (``Trainability.set_experts``), so the
others stay bit-identical under AdamW.  Mixed batches (Eq. 8): ``route_mask``
gives the core's per-(token, expert) weight-gradient mask M[d_i, e], and the
union of the present domains' S_d is trainable.

``DGES`` (below) is the idea in one place for DES-MoE's method: the A/M map, when
it refreshes, which experts a step may update (isolation), the token route masks,
and duplication's bookkeeping -- when copies are made, which slots a domain trains
and routes to.  Duplication's mechanics (spare slots, the copy tables) are
``duplication.ExpertCopies``; method.py only composes ALR + DGES + the schedule.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from desmoe.recipes.des_moe.config import DGESConfig
from desmoe.recipes.des_moe.duplication import ExpertCopies
from desmoe.moe import moe_blocks
from desmoe.moe.device_copies import DeviceCopies


class DomainExpertMap:
    def __init__(self, num_layers: int, num_domains: int, num_experts: int, cfg: Optional[DGESConfig] = None) -> None:
        self.cfg = cfg or DGESConfig()
        self.shape = (num_layers, num_domains, num_experts)
        self._pending: Optional[Tensor] = None  # record_model's counts not yet added to the window (device)
        self.window = torch.zeros(self.shape, dtype=torch.float64)  # top-K counts since the last refresh
        self.window_tokens = torch.zeros(num_layers, num_domains, dtype=torch.float64)
        self.A: Optional[Tensor] = None  # [L, D, E] smoothed affinity (None until the first refresh)
        self.M: Optional[Tensor] = None  # [L, D, E] bool
        self.refreshes = 0
        self._device_copies = DeviceCopies()  # of M, read by every forward's route masks

    @property
    def ready(self) -> bool:
        return self.M is not None

    def record(self, layer: int, expert_ids: Tensor, token_domain: Tensor) -> None:
        """Count one layer's routing: expert_ids [S, k], token_domain [S] (negative = not counted)."""
        self._add([layer], self._counts(expert_ids, token_domain).unsqueeze(0))

    def record_model(self, model: nn.Module, token_domain: Tensor) -> None:
        """Count the last forward of every MoE block; token_domain matches the flattened tokens."""
        blocks = moe_blocks(model)
        if blocks:  # every layer counted on the device and kept there: read back when the window is read
            counts = torch.stack([self._counts(b.last_routing.expert_ids, token_domain) for b in blocks])
            self._pending = counts if self._pending is None else self._pending + counts  # integers: exact

    # The window is read at a refresh or a checkpoint; a read-back of every step's counts waited for the GPU.
    @property
    def window(self) -> Tensor:
        self._fold()
        return self._window

    # A setter folds the pending counts first: they hold both tensors' counts, and replacing one of them
    # used to drop the other's unread counts with it.
    @window.setter
    def window(self, value: Tensor) -> None:
        self._fold()
        self._window = value

    @property
    def window_tokens(self) -> Tensor:
        self._fold()
        return self._window_tokens

    @window_tokens.setter
    def window_tokens(self, value: Tensor) -> None:
        self._fold()
        self._window_tokens = value

    def _fold(self) -> None:
        if self._pending is not None:
            counts, self._pending = self._pending, None
            self._add(range(counts.shape[0]), counts)

    def _counts(self, expert_ids: Tensor, token_domain: Tensor) -> Tensor:
        """[D * E + D] float64 on the routing's device: (domain, expert) routes, then tokens per domain.
        Weighted scatter_adds, not a boolean selection and bincount: on CUDA those read sizes back to the
        host, which every layer of every training step waited for."""
        num_domains, num_experts = self.shape[1:]
        dom = token_domain.reshape(-1).to(expert_ids.device, torch.long)  # scatter indices are int64
        valid = (dom >= 0).double()
        dom = dom.clamp_min(0)
        out = torch.zeros(num_domains * (num_experts + 1), dtype=torch.float64, device=expert_ids.device)
        out.scatter_add_(0, (dom.unsqueeze(1) * num_experts + expert_ids).reshape(-1),
                         valid.unsqueeze(1).expand(expert_ids.shape).reshape(-1))
        return out.scatter_add_(0, num_domains * num_experts + dom, valid)

    def _add(self, layers, counts: Tensor) -> None:
        num_domains, num_experts = self.shape[1:]
        counts = counts.cpu()
        for i, layer in enumerate(layers):
            self._window[layer] += counts[i, :num_domains * num_experts].view(num_domains, num_experts)
            self._window_tokens[layer] += counts[i, num_domains * num_experts:]

    def refresh(self, group=None) -> None:
        """Sum the window over ranks, update A (Eq. 5 / Eq. 9) and M (Eq. 6), start a new window."""
        from desmoe.collectives import all_reduce_

        packed = all_reduce_(torch.cat([self.window.reshape(-1), self.window_tokens.reshape(-1)]), group=group)
        counts = packed[: self.window.numel()].view(self.shape)
        tokens = packed[self.window.numel():].view(self.shape[:2])
        fresh = counts / tokens.clamp_min(1.0).unsqueeze(-1)
        if self.A is None:
            self.A = fresh
        else:
            m = self.cfg.momentum
            self.A = m * fresh + (1 - m) * self.A if self.cfg.momentum_on == "new" else m * self.A + (1 - m) * fresh
        self.M = specialization_mask(self.A, self.cfg.phi)
        self.window.zero_()
        self.window_tokens.zero_()
        self.refreshes += 1

    def experts_for(self, layer: int, domain: int) -> list[int]:
        """S_d of one layer (global expert ids)."""
        return torch.nonzero(self.M[layer, domain]).flatten().tolist()

    def route_mask(self, layer: int, token_domain: Tensor) -> Tensor:
        """[S, E] bool: M[d_i, e] for every token i (Eq. 8); unlabelled tokens (d < 0) own no expert,
        as they count in no row of A."""
        dom = token_domain.reshape(-1)
        rows = self._device_copies.get("M", self.M, dom.device)[layer][dom.clamp_min(0)]
        return rows & (dom >= 0).unsqueeze(1)

    def claimed_by_several(self, layer: int) -> list[int]:
        """Experts with M = 1 in more than one domain: the paper's duplication candidates."""
        return torch.nonzero(self.M[layer].sum(0) > 1).flatten().tolist()

    def state_dict(self, group=None) -> dict:
        """Collective (every rank): the window counts are per rank, and a checkpoint's client state is
        rank 0's, so rank 0 first takes the sum over ranks and the others keep zeros -- the next
        refresh's all-reduce gives the same total, before or after a resume."""
        import deepspeed.comm as dist

        from desmoe.collectives import all_reduce_, is_distributed

        if is_distributed(group):
            packed = all_reduce_(torch.cat([self.window.reshape(-1), self.window_tokens.reshape(-1)]), group=group)
            packed = packed if dist.get_rank(group=group) == 0 else torch.zeros_like(packed)
            self.window.copy_(packed[: self.window.numel()].view_as(self.window))
            self.window_tokens.copy_(packed[self.window.numel():].view_as(self.window_tokens))
        return {"window": self.window, "window_tokens": self.window_tokens, "A": self.A, "M": self.M,
                "refreshes": self.refreshes}

    def load_state_dict(self, state: dict, group=None) -> None:
        import deepspeed.comm as dist

        self.window, self.window_tokens = state["window"].clone(), state["window_tokens"].clone()
        if dist.is_initialized() and dist.get_rank(group=group) != 0:  # rank 0 holds the ranks' sum
            self.window.zero_()
            self.window_tokens.zero_()
        self.A, self.M, self.refreshes = state["A"], state["M"], state["refreshes"]


def counted_positions(loss_mask: Optional[Tensor], tokens: str) -> Optional[Tensor]:
    """Which input positions the routing statistics count (``desmoe.routing_stats_tokens``).

    ``loss_mask`` is a batch's [B, T+1] label mask (the label at t+1 counts iff ``loss_mask[:, t+1]``);
    the inputs are positions 0..T-1.  "response": the positions whose next-token label is in the loss
    (for instruction data: the last prompt token, which predicts the first response token, then the
    response up to the token before its end); "all": every position.  None = every position (also when
    every label counts, e.g. text-only data, so such batches take exactly the path they took before)."""
    if tokens not in ("response", "all"):
        raise ValueError(f"routing_stats_tokens '{tokens}': expected 'response' or 'all'")
    if tokens == "all" or loss_mask is None:
        return None
    labels = loss_mask[:, 1:].bool()
    return None if bool(labels.all()) else labels


def stats_token_domain(token_domain: Tensor, loss_mask: Optional[Tensor], tokens: str) -> Tensor:
    """``token_domain`` [B, T] of the input positions, with the positions the statistics do not count
    set to -1 (counted in no row of A); the same tensor when every position counts."""
    keep = counted_positions(loss_mask, tokens)
    if keep is None:
        return token_domain
    return token_domain.masked_fill(~keep.to(token_domain.device), -1)


def specialization_mask(A: Tensor, phi: float) -> Tensor:
    """Eq. 6 on the last axis: A >= phi * row max; an all-zero row selects nothing."""
    row_max = A.amax(dim=-1, keepdim=True)
    return (A >= phi * row_max) & (row_max > 0)


class DGES:
    """DGES for one model: A/M (``map``), duplication's copies (``copies``, None when off) and the
    per-step decisions built on them.  ``t1``: the step at which the first M is made (end of warm-up)."""

    def __init__(self, blocks: list, num_domains: int, cfg: DGESConfig, t1: int) -> None:
        self.cfg, self.t1, self.num_blocks = cfg, t1, len(blocks)
        self.map = DomainExpertMap(len(blocks), num_domains, blocks[0].router.num_experts, cfg)
        self.copies = ExpertCopies(blocks, num_domains, cfg.spare_experts) \
            if cfg.enabled and cfg.duplicate_shared else None

    def expert_sets(self, present: list[int]) -> list[list[int]]:
        """Isolation (Eq. 7/8): per block, the expert slots a step of the ``present`` domains may update --
        the union of their S_d (experts no present domain owns stay bit-identical under AdamW), each
        logical expert mapped to the present domains' copies."""
        if not self.map.ready:  # e.g. resumed from a pre-DGES checkpoint
            self.map.refresh()
        sets = [sorted({e for d in present for e in self.map.experts_for(b, d)}) for b in range(self.num_blocks)]
        if self.copies is not None:
            sets = [self.copies.slots_for(b, present, sets[b]) for b in range(self.num_blocks)]
        return sets

    def restrict_to_used(self, train) -> None:
        """When every expert trains: never the unused spare slots."""
        if self.copies is not None:
            for b in range(self.num_blocks):
                train.set_experts(b, self.copies.used_slots(b))

    def install(self, blocks: list, token_domain: Optional[Tensor], mask_routes: bool) -> None:
        """Before a forward: token route masks (Eq. 8: route (i, e) teaches e only if d_i owns e) and
        each domain's tokens on its own copies.  The caller clears both after the forward."""
        if mask_routes:
            if token_domain is None:
                raise ValueError("token-level masking (dges.batching=token) needs the batch's token domains")
            for b, block in enumerate(blocks):
                block.weight_grad_mask = self.map.route_mask(b, token_domain)
        if self.copies is not None and self.copies.made and token_domain is not None:
            for b, block in enumerate(blocks):
                block.route_slots = self.copies.route_slots(b, token_domain)

    def record(self, model: nn.Module, token_domain: Tensor) -> None:
        """Count the routing of the model's last forward (a micro-batch of a step that accumulates)."""
        self.map.record_model(model, token_domain)

    def end_step(self, model: nn.Module, step: int, token_domain: Tensor, on_weights_changed=None) -> bool:
        """Count the step's (last) routing; refresh A/M at t1 and every ``update_every`` steps after, and at the
        first M make the copies (``on_weights_changed`` gets the written slots).  True when refreshed."""
        self.record(model, token_domain)
        t, every = step + 1, self.cfg.update_every
        if not (t == self.t1 or (t > self.t1 and every and (t - self.t1) % every == 0)):
            return False
        self.map.refresh()
        if self.copies is not None and not self.copies.made:  # duplication at the first M
            self.copies.create(self.map.A, self.map.M)
            self.copies.apply_inference(self.cfg.duplicate_inference)
            if on_weights_changed is not None:
                on_weights_changed(self.copies.written)
        return True

    def report(self, domains) -> tuple[dict[str, float], dict[str, dict]]:
        A, M, layers = self.map.A, self.map.M, self.map.A.shape[0]
        images = {f"dges/A_layer{layer}": dict(matrix=A[layer].numpy(), xlabel="expert", ylabel="domain",
                                               yticks=list(domains), vmin=0.0, vmax=1.0,
                                               title=f"DGES affinity A (share of tokens routed), layer {layer}")
                  for layer in range(layers)}
        scalars = {"dges/expert_copies": float(self.copies.count)} if self.copies is not None else {}
        scalars.update({"dges/experts_per_domain": M.float().sum(-1).mean().item(),
                        "dges/shared_by_several": float(sum(len(self.map.claimed_by_several(l))
                                                            for l in range(layers)))})
        return scalars, images

    def state_dict(self) -> dict:
        return {"dges": self.map.state_dict(), **({"copies": self.copies.state_dict()} if self.copies else {})}

    def load_state_dict(self, state: dict) -> None:
        self.map.load_state_dict(state["dges"])
        if self.copies is not None:
            self.copies.load_state_dict(state.get("copies"))
            self.copies.apply_inference(self.cfg.duplicate_inference)
