"""The batches of a multi-domain run: which domain each step trains (equal shares, seeded), one
stream per domain positioned for a resumed start, or one stream of mixed batches (``dges.batching: token``)."""
from __future__ import annotations

import torch

from desmoe.collectives import all_reduce_


def domain_of_step(step: int, num_domains: int, seed: int) -> int:
    """Equal shares: each block of ``num_domains`` steps visits every domain once, in a seeded order."""
    cycle, pos = divmod(step, num_domains)
    order = torch.randperm(num_domains, generator=torch.Generator().manual_seed(seed * 7919 + cycle))
    return int(order[pos])


class DomainStreams:
    """One batch iterator per domain, positioned for a (resumed) start step; with
    ``dges.batching: token`` one stream of mixed batches instead (domain -1)."""

    def __init__(self, data, cfg, rank: int, world: int, start: int) -> None:
        n, t = len(data.domains), cfg.train
        self.mixed = cfg.desmoe.dges.batching == "token"
        if self.mixed:  # streams count micro-batches: grad_accum a step
            self.streams = [data.batches("train", t.micro_batch, t.seq_len, t.seed, rank, world,
                                         start * t.grad_accum, domains=data.domains, homogeneous=False)]
            return
        done = [0] * n
        for s in range(start):
            done[domain_of_step(s, n, t.seed)] += t.grad_accum
        self.streams = [data.batches("train", t.micro_batch, t.seq_len, t.seed, rank, world, done[d],
                                     domains=[name], homogeneous=True) for d, name in enumerate(data.domains)]

    def next(self, domain: int):
        return next(self.streams[0 if self.mixed else domain])


def present_domains(token_domain: torch.Tensor, num_domains: int) -> list[int]:
    """Domains with a token on any rank (every rank must freeze the same experts)."""
    dom = token_domain.reshape(-1)
    seen = all_reduce_(torch.bincount(dom[dom >= 0], minlength=num_domains).clamp(max=1))
    return torch.nonzero(seen).flatten().tolist()
