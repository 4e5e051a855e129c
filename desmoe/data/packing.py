"""Packed, blended, domain-labelled training sequences.

A sample is ``seq_len + 1`` tokens cut from whole documents laid end to end
(each document ends with ``eos``), so ``input_ids[:, :-1]`` are the inputs and
``input_ids[:, 1:]`` the labels.  Every token carries the id of the domain its
document came from (``token_domain``); ``domain`` is the sample's domain (with
mixed sequences: the domain of most of its tokens, ties to the lower id).

``homogeneous=True`` draws one domain per micro-batch, so every sample of a
micro-batch (and every token) belongs to it: what DES-MoE's domain-guided
routing wants.  ``homogeneous=False`` draws a domain per document, so sequences
mix domains.

``loss_mask`` says which labels the loss counts: the label at position ``t+1``
counts iff ``loss_mask[:, t+1]``.  Instruction records carry a stored mask
(1 on response tokens and the closing eos, 0 on the prompt); plain text is all
ones.  The mask is cut and laid end to end exactly like ``token_domain``, and
reading it draws nothing from the generator, so text-only data gives the same
batches as before masks existed.  With a tokenizer whose encodings start with a
prefix (a Llama-style BOS, ``prefix_len``), every document starts with it and
its label never counts: the BOS after the previous document's eos is markup
the model is always given, never text to predict (HF-style pretraining packing
trains it; its loss is near zero after a few steps and says nothing about the
text; SFT recipes mask it with the prompt); the first token after it is
predicted from BOS, as at inference.  Packed documents attend to the documents
before them in the sample (plain causal attention, positions run on): cheap,
and what pretraining did; see docs/data.md.

Positions are a pure function of ``(seed, step, rank)`` (plus the split): the
batch for step ``s`` on rank ``r`` is the same whether or not the run was
interrupted before it, so resumes are exact, and ranks never share a stream.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch


@dataclass
class DomainBatch:
    input_ids: torch.Tensor      # LongTensor [B, T+1]
    domain: torch.Tensor         # LongTensor [B]: the sample's domain id
    token_domain: torch.Tensor   # LongTensor [B, T+1]: domain id of every token
    step: int = -1               # the step it was drawn for (-1: a source that is not step-keyed)
    loss_mask: Optional[torch.Tensor] = None  # BoolTensor [B, T+1]; None: every label counts

    def __post_init__(self) -> None:
        if self.loss_mask is None:  # sources without masks (byte corpora, plain text): all ones
            self.loss_mask = torch.ones(self.input_ids.shape, dtype=torch.bool)

    def mask_for_loss(self, device) -> Optional[torch.Tensor]:
        """The mask for ``next_token_loss``, None when every label counts: text-only batches take the
        unmasked path and stay bit-for-bit what they were (checked on the CPU copy: no device sync)."""
        return None if bool(self.loss_mask[:, 1:].all()) else self.loss_mask.to(device)

    @property
    def inputs(self) -> torch.Tensor:
        return self.input_ids[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        return self.input_ids[:, 1:]


class DomainSampler:
    """Draws packed samples from per-domain indexed datasets (one document per item)."""

    def __init__(self, datasets: dict[int, object], weights: Optional[dict[int, float]] = None,
                 split_key: str = "train", masks: Optional[dict[int, object]] = None, prefix_len: int = 0) -> None:
        """``masks``: domain -> indexed dataset of uint8 loss masks aligned with its documents
        (domains without one count every label); ``prefix_len``: the tokens every document starts with
        (the tokenizer's BOS), whose labels never count."""
        self.prefix_len = int(prefix_len)
        self.datasets = {d: ds for d, ds in sorted(datasets.items())}
        self.masks = dict(masks or {})
        self.ids = np.array(list(self.datasets), dtype=np.int64)
        w = np.array([1.0 if weights is None else float(weights[d]) for d in self.ids])
        self.p = w / w.sum()
        self.sizes = {d: np.asarray(ds.sequence_lengths, dtype=np.int64) for d, ds in self.datasets.items()}
        self.split_code = zlib.crc32(split_key.encode())

    def rng(self, seed: int, step: int, rank: int, world: int) -> np.random.Generator:
        # the world size is part of a stream's identity: a run restarted at another
        # world size gets fresh streams instead of re-using another rank's
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, self.split_code, world, step, rank])))

    def _sample(self, rng: np.random.Generator, length: int,
                domain: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens, owners, masks, have, first = [], [], [], 0, True
        while have < length:
            d = int(domain if domain is not None else rng.choice(self.ids, p=self.p))
            doc = int(rng.integers(len(self.sizes[d])))
            size = int(self.sizes[d][doc])
            # the first document may start anywhere that still fills the sample
            offset = int(rng.integers(size - length + 1)) if first and size > length else 0
            take = min(length - have, size - offset)
            tokens.append(np.asarray(self.datasets[d].get(doc, offset, take), dtype=np.int64))
            owners.append(np.full(take, d, dtype=np.int64))
            # the same (doc, offset, take) as the tokens, and no draw from rng: the stream is unchanged
            masks.append(np.asarray(self.masks[d].get(doc, offset, take), dtype=bool) if d in self.masks
                         else np.ones(take, dtype=bool))
            if offset < self.prefix_len:  # the document's own start: its prefix is never a label
                masks[-1] = masks[-1].copy()  # never write through to a stored (memory-mapped) mask
                masks[-1][: self.prefix_len - offset] = False
            have += take
            first = False
        return np.concatenate(tokens), np.concatenate(owners), np.concatenate(masks)

    def batch(self, micro_batch: int, seq_len: int, seed: int, step: int, rank: int, world: int,
              homogeneous: bool) -> DomainBatch:
        rng = self.rng(seed, step, rank, world)
        fixed = int(rng.choice(self.ids, p=self.p)) if homogeneous else None
        ids = np.empty((micro_batch, seq_len + 1), dtype=np.int64)
        owner = np.empty_like(ids)
        mask = np.empty(ids.shape, dtype=bool)
        for b in range(micro_batch):
            ids[b], owner[b], mask[b] = self._sample(rng, seq_len + 1, fixed)
        if fixed is not None:
            domain = np.full(micro_batch, fixed, dtype=np.int64)
        else:  # majority domain of the sample; argmax takes the lowest id on ties
            counts = np.stack([(owner == d).sum(1) for d in self.ids], axis=1)
            domain = self.ids[counts.argmax(1)]
        return DomainBatch(torch.from_numpy(ids), torch.from_numpy(domain), torch.from_numpy(owner), step,
                           torch.from_numpy(mask))

    def iterate(self, micro_batch: int, seq_len: int, seed: int, rank: int, world: int, step: int = 0,
                homogeneous: bool = True) -> Iterator[DomainBatch]:
        while True:
            yield self.batch(micro_batch, seq_len, seed, step, rank, world, homogeneous)
            step += 1
