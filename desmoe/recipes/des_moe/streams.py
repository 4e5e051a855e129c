"""The batches of a multi-domain run: which domain each step trains (equal shares, seeded), one
stream per domain positioned for a resumed start, or one stream of mixed batches (``dges.batching: token``)."""
from __future__ import annotations

import torch

from desmoe import reshard
from desmoe.collectives import all_reduce_


def domain_of_step(step: int, num_domains: int, seed: int) -> int:
    """Equal shares: each block of ``num_domains`` steps visits every domain once, in a seeded order."""
    cycle, pos = divmod(step, num_domains)
    order = torch.randperm(num_domains, generator=torch.Generator().manual_seed(seed * 7919 + cycle))
    return int(order[pos])


class DomainStreams:
    """One batch iterator per domain, positioned for a (resumed) start step; with
    ``dges.batching: token`` one stream of mixed batches instead (domain -1).  With ``trainer``, each stream
    draws its micro-batches with the run's saved stream layout (``reshard.stream``), so a run resumed at
    another world size continues with the samples an uninterrupted one would draw."""

    def __init__(self, data, cfg, rank: int, world: int, start: int, trainer=None) -> None:
        n, t = len(data.domains), cfg.train
        self.mixed = cfg.desmoe.dges.batching == "token"

        def positioned(first: int, domains: list, homogeneous: bool):
            def open_at(index: int, r: int, w: int):
                return data.batches("train", t.micro_batch, t.seq_len, t.seed, r, w, index, domains=domains,
                                    homogeneous=homogeneous)

            return reshard.stream(trainer, open_at, first) if trainer is not None else open_at(first, rank, world)

        if self.mixed:  # streams count micro-batches: grad_accum a step
            self.streams = [positioned(start * t.grad_accum, data.domains, False)]
            return
        done = [0] * n  # a domain's stream counts its own steps' micro-batches
        for s in range(start):
            done[domain_of_step(s, n, t.seed)] += t.grad_accum
        self.streams = [positioned(done[d], [name], True) for d, name in enumerate(data.domains)]

    def next(self, domain: int):
        return next(self.streams[0 if self.mixed else domain])


def present_domains(token_domain: torch.Tensor, num_domains: int) -> list[int]:
    """Domains with a token on any rank (every rank must freeze the same experts)."""
    dom = token_domain.reshape(-1)
    seen = all_reduce_(torch.bincount(dom[dom >= 0], minlength=num_domains).clamp(max=1))
    return torch.nonzero(seen).flatten().tolist()
