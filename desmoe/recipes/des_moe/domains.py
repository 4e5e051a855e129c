"""Domain-labelled batches: the protocol the trainer needs, and a stand-in source.

The project's data pipeline (``desmoe.data.PreparedData``) implements
:class:`DomainBatches`.  :class:`StdlibDomains` is a small real-text stand-in:
pseudo-domains are module families of Python's standard library (asyncio, email,
...), byte level, with held-out families as the "general" set.  Files go to
train/validation by a hash of their path, as in ``desmoe.data.text_corpus``.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor

from desmoe.config import bad
from desmoe.data.packing import DomainBatch  # the one batch type of every domain-labelled source
from desmoe.errors import UserError


class DomainBatches(Protocol):
    domains: list[str]

    def batches(self, split: str, micro_batch: int, seq_len: int, seed: int, rank: int, world: int, step: int,
                domains: Optional[Sequence[str]] = None, homogeneous: bool = True) -> Iterator[DomainBatch]: ...


@dataclass
class DomainDataConfig:
    # "stdlib": pseudo-domains from Python's sources; otherwise a prepared-data root (desmoe.data.PreparedData)
    source: str = "stdlib"
    # stdlib: package folders; prepared: a subset of the data's domains ([] = all but the held-out set)
    domains: list[str] = field(default_factory=lambda: ["asyncio", "email", "multiprocessing", "unittest", "xml",
                                                        "idlelib"])
    general: list[str] = field(default_factory=lambda: ["logging", "http", "urllib"])  # held out (stdlib only)
    max_bytes_per_domain: int = 400_000
    val_fraction: float = 0.1

    def check(self) -> None:
        if not self.domains and self.source == "stdlib":
            raise bad("domains", "at least one domain")
        if len(set(self.domains)) != len(self.domains):
            raise bad("domains", "distinct names", self.domains)
        if self.max_bytes_per_domain < 20_000:
            raise bad("max_bytes_per_domain", "at least 20000", self.max_bytes_per_domain)
        if not 0 < self.val_fraction < 0.5:
            raise bad("val_fraction", "a number in (0, 0.5)", self.val_fraction)


def _family_bytes(root: Path, family: str, max_bytes: int, val_fraction: float) -> tuple[Tensor, Tensor]:
    folder = root / family
    files = sorted(p for p in folder.rglob("*.py") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise UserError(f"data.domains: '{family}' is not a package folder of {root}")
    train, val = bytearray(), bytearray()
    for path in files:
        is_val = hashlib.sha256(str(path.relative_to(root)).encode()).digest()[0] / 256.0 < val_fraction
        target = val if is_val else train
        if len(target) < (max_bytes * val_fraction if is_val else max_bytes):
            target.extend(path.read_bytes() + b"\n")
    if len(val) < 1_000:  # a family of a few big files: hold out its tail instead
        cut = int(len(train) * (1 - val_fraction))
        train, val = train[:cut], train[cut:]
    if len(train) < 5_000 or len(val) < 1_000:
        raise UserError(f"data.domains: '{family}' has too little text ({len(train)} train / {len(val)} val bytes)")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()  # noqa: E731
    return as_tensor(train[:max_bytes]), as_tensor(val)


class StdlibDomains:
    """Byte-level pseudo-domains from Python's standard library (real text, no download)."""

    vocab_size = 256

    def __init__(self, cfg: DomainDataConfig) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        self.domains = list(cfg.domains)
        self.splits = {name: _family_bytes(root, name, cfg.max_bytes_per_domain, cfg.val_fraction)
                       for name in [*cfg.domains, *cfg.general]}
        self.general = list(cfg.general)

    def batches(self, split: str, micro_batch: int, seq_len: int, seed: int, rank: int, world: int, step: int,
                domains: Optional[Sequence[str]] = None, homogeneous: bool = True) -> Iterator[DomainBatch]:
        """Windows for (seed, step, rank) from ``step`` on: a pure function of the arguments.
        ``split`` is "train" or "val"; ``domains`` may also name the general families."""
        names = list(domains or self.domains)
        index = {n: i for i, n in enumerate(self.domains)}
        while True:
            key = repr((seed, split, step, rank, names)).encode()  # str hash() differs between processes
            gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:4], "little"))
            if homogeneous:
                picks = [names[(step * world + rank) % len(names)]] * micro_batch
            else:
                picks = [names[i] for i in torch.randint(0, len(names), (micro_batch,), generator=gen).tolist()]
            rows = []
            for name in picks:
                data = self.splits[name][0 if split == "train" else 1]
                start = int(torch.randint(0, data.numel() - seq_len - 1, (1,), generator=gen))
                rows.append(data[start:start + seq_len + 1].long())
            dom = torch.tensor([index.get(n, -1) for n in picks])
            yield DomainBatch(torch.stack(rows), dom, dom.unsqueeze(1).expand(-1, seq_len + 1).clone())
            step += 1


class PreparedDomains:
    """A view of :class:`desmoe.data.PreparedData` restricted to the fine-tuning domains: domain ids
    become positions in ``self.domains`` (other domains -1); "general" is the held-out test text."""

    def __init__(self, cfg: DomainDataConfig) -> None:
        from desmoe.data import PreparedData

        self.data = PreparedData(cfg.source)
        self.domains = list(cfg.domains) or [d for d in self.data.domains if d != "general"]
        for d in self.domains:
            self.data.domain_id(d)  # one-line error for unknown names
        self.general = [self.data.heldout_name]
        self.tokenizer = self.data.tokenizer
        self.remap = torch.full((len(self.data.domains) + 1,), -1, dtype=torch.long)
        for i, d in enumerate(self.domains):
            self.remap[self.data.domain_id(d)] = i

    def batches(self, split, micro_batch, seq_len, seed, rank, world, step, domains=None, homogeneous=True):
        if list(domains or []) == self.general:
            split, domains = "test", None
            names = [self.data.heldout_name]
        else:
            names = list(domains or self.domains)
        for batch in self._iterate(split, micro_batch, seq_len, seed, rank, world, step, names, homogeneous):
            yield DomainBatch(batch.input_ids, self.remap[batch.domain.clamp_min(-1)],
                              self.remap[batch.token_domain.clamp_min(-1)], loss_mask=batch.loss_mask)

    def _iterate(self, split, micro_batch, seq_len, seed, rank, world, step, names, homogeneous):
        if names == [self.data.heldout_name]:
            from desmoe.data.packing import DomainSampler

            sampler = DomainSampler({len(self.data.domains): self.data.indexed(names[0], "test")}, None,
                                    split_key="test", prefix_len=self.data.prefix_len)  # a BOS is no label
            return sampler.iterate(micro_batch, seq_len, seed, rank, world, step, homogeneous)
        return self.data.batches(split, micro_batch, seq_len, seed, rank, world, step, domains=names,
                                 homogeneous=homogeneous)


def open_domains(cfg: DomainDataConfig) -> DomainBatches:
    if cfg.source == "stdlib":
        return StdlibDomains(cfg)
    return PreparedDomains(cfg)
