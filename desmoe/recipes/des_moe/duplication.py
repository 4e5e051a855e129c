"""Expert duplication (DES-MoE Sec. 3.2): "if an expert is highly active in more than one
domain, we duplicate it to maintain distinct, domain-specialized copies without
reducing capacity for other domains".  The paper gives no mechanics; ours:

* before the engine exists, every MoE layer gets ``dges.spare_experts`` spare slots
  (``desmoe.moe.slots``: the same number on every EP rank, no expert moves);
* at the first M (end of warm-up), for each logical expert e claimed by several
  domains, the claimant with the highest affinity A[d, e] keeps e, each other
  claimant gets a copy of e's weights in a free spare slot (same EP rank as e
  when one is free, else any rank), as long as spares last;
* while training, a token of domain d routed to e runs on d's slot for e
  (``MoEBlock.route_slots``); the router is not grown: it still chooses e with e's
  score, so the copy changes nothing at creation and no other domain loses
  capacity; the optimizer trains d's slots of S_d only;
* without domain labels (evaluation, generation) e runs on its original slot
  (``dges.duplicate_inference: original``) or on all its slots, outputs averaged
  (``average``; costs one expert call per copy).

Copies are made once: later refreshes of M keep the table (a domain that claims an
expert later shares its original).  See docs/desmoe.md for the alternatives.

This file is the mechanics (slots, tables, copying); when copies are made and which
slots a step trains and routes to is DGES's bookkeeping, in ``dges.DGES``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from desmoe.moe import MoEBlock
from desmoe.moe.device_copies import DeviceCopies
from desmoe.moe.slots import add_spare_slots, copy_slots


class ExpertCopies:
    def __init__(self, blocks: list[MoEBlock], num_domains: int, spare_per_layer: int) -> None:
        self.blocks = blocks
        self.spares = [add_spare_slots(b, spare_per_layer // b.ep_size) for b in blocks]
        # tables[l][d, e] = the slot that domain d's tokens routed to logical expert e run on
        self.originals = [b.slot_of_expert.clone() for b in blocks]
        self.tables = [o.repeat(num_domains, 1) for o in self.originals]
        self.made = False
        self._device_copies = DeviceCopies()  # of the tables, read by every labelled forward

    def create(self, A: Tensor, M: Tensor) -> int:
        """Make the copies from the first M ([L, D, E]); returns how many were made."""
        made, self.written = 0, []  # (layer, slot) whose weights were overwritten
        for layer, block in enumerate(self.blocks):
            free, table, pairs = list(self.spares[layer]), self.tables[layer], []
            claims = M[layer].sum(0)
            shared = sorted(torch.nonzero(claims > 1).flatten().tolist(),
                            key=lambda e: (-int(claims[e]), -float(A[layer, :, e].sum()), e))
            for e in shared:
                owners = sorted(torch.nonzero(M[layer, :, e]).flatten().tolist(), key=lambda d: -float(A[layer, d, e]))
                original = int(block.slot_of_expert[e])
                for d in owners[1:]:
                    if not free:
                        break
                    same_rank = [s for s in free if s // block.num_local_experts == original // block.num_local_experts]
                    slot = (same_rank or free)[0]
                    free.remove(slot)
                    table[d, e] = slot
                    pairs.append((original, slot))
            copy_slots(block, pairs)
            self.written += [(layer, dst) for _, dst in pairs]
            self.spares[layer] = free
            made += len(pairs)
        self.made = True
        return made

    @property
    def count(self) -> int:
        """Copies made so far, read from the tables (so it survives a resume)."""
        return sum(int((table != original).sum()) for table, original in zip(self.tables, self.originals))

    def slots_for(self, layer: int, domains: list[int], experts: list[int]) -> list[int]:
        """The slots a step of these domains trains for these logical experts."""
        return sorted({int(self.tables[layer][d, e]) for d in domains for e in experts})

    def used_slots(self, layer: int) -> list[int]:
        return sorted(set(self.tables[layer].flatten().tolist()))

    def fanout(self, layer: int) -> Tensor:
        """[E, R]: every slot of each logical expert (original first, -1 padded), for averaging."""
        table = self.tables[layer]
        rows = [[int(self.originals[layer][e])] + sorted(set(table[:, e].tolist()) - {int(self.originals[layer][e])})
                for e in range(table.shape[1])]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows])

    def apply_inference(self, mode: str) -> None:
        """How unlabelled forwards (evaluation, generation) use the copies: "original" runs e itself,
        "average" the mean of the outputs of e and its copies."""
        for layer, block in enumerate(self.blocks):
            block.slot_fanout = self.fanout(layer) if mode == "average" and self.made else None

    def route_slots(self, layer: int, token_domain: Tensor) -> Tensor:
        """[S, E] slot per (token, logical expert); unlabelled tokens use the originals."""
        dom = token_domain.reshape(-1)
        table = self._device_copies.get(("table", layer), self.tables[layer], dom.device)
        original = self._device_copies.get(("original", layer), self.originals[layer], dom.device)
        return torch.where((dom >= 0).unsqueeze(1), table[dom.clamp_min(0)], original.unsqueeze(0))

    def state_dict(self) -> dict:
        return {"tables": self.tables, "spares": self.spares, "made": self.made}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.tables, self.spares, self.made = state["tables"], state["spares"], state["made"]
