"""What pretraining reads: packed training batches, held-out token streams and token counts,
from a prepared data folder (``GeneralCorpus``) or from Python's own sources (``StdlibBytes``, tests)."""
from __future__ import annotations

import numpy as np
import torch

from desmoe.errors import UserError


class GeneralCorpus:
    """What pretraining reads from a prepared data folder (``desmoe.data.PreparedData``):
    packed training batches of the chosen domains, the held-out general text as one
    token stream, and token counts of the training split (for the unigram baseline)."""

    def __init__(self, cfg) -> None:
        from desmoe.data import PreparedData

        self.data = PreparedData(cfg.root)
        self.domains = list(cfg.domains) if cfg.domains else ["general"]
        for d in self.domains:
            self.data.domain_id(d)  # one line naming the known domains if wrong
        masked = [d for d in self.domains if d in self.data.masked]
        if masked:  # train_batches yields tokens only: the records' loss masks would be dropped without a word
            raise UserError(f"key 'data.domains': '{masked[0]}' of {cfg.root} holds instruction records, whose "
                            f"loss counts their responses only; pretraining counts every token and would train on "
                            f"the prompts (fine-tune on it with launcher/desmoe.py, e.g. desmoe.method=fft)")
        self.tokenizer = self.data.tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.special = {"bos_id": self.tokenizer.bos_id, "eos_id": self.tokenizer.eos_id,
                        "pad_id": self.tokenizer.pad_id}

    def train_batches(self, micro_batch: int, seq_len: int, seed: int, rank: int, world: int, step: int):
        for batch in self.data.batches("train", micro_batch, seq_len, seed, rank, world, step, self.domains,
                                       homogeneous=False):
            yield batch.input_ids

    def heldout_stream(self, max_tokens: int) -> torch.Tensor:
        ds = self.data.indexed(self.data.heldout_name, "test")
        return _first_tokens((ds[i] for i in range(len(ds))), max_tokens)

    def test_stream(self, max_tokens: int) -> torch.Tensor:
        """The training domains' own test split (in-domain held-out documents)."""
        docs = (ds[i] for ds in (self.data.indexed(d, "test") for d in self.domains) for i in range(len(ds)))
        return _first_tokens(docs, max_tokens)

    def train_counts(self) -> torch.Tensor:
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for d in self.domains:
            ds = self.data.indexed(d, "train")
            for i in range(len(ds)):
                counts += np.bincount(np.asarray(ds[i], dtype=np.int64), minlength=self.vocab_size)[:self.vocab_size]
        return torch.from_numpy(counts)


class StdlibBytes:
    """The same three things over Python's own sources, byte-level (tests; no data folder needed)."""

    tokenizer = None
    vocab_size = 256
    special: dict = {}

    def __init__(self) -> None:
        from desmoe.data.text_corpus import TextCorpusConfig, load_byte_corpus

        self.train, self.heldout = load_byte_corpus(TextCorpusConfig(max_bytes=2_000_000))

    def train_batches(self, micro_batch: int, seq_len: int, seed: int, rank: int, world: int, step: int):
        from desmoe.data.text_corpus import sample_windows

        while True:
            yield sample_windows(self.train, micro_batch, seq_len + 1, seed, step, rank + 1000 * world)
            step += 1

    def heldout_stream(self, max_tokens: int) -> torch.Tensor:
        return self.heldout[:max_tokens].long()

    test_stream = heldout_stream

    def train_counts(self) -> torch.Tensor:
        return torch.bincount(self.train.long(), minlength=256)


def _first_tokens(docs, max_tokens: int) -> torch.Tensor:
    out, n = [], 0
    for doc in docs:
        out.append(np.asarray(doc, dtype=np.int64))
        n += len(out[-1])
        if n >= max_tokens:
            break
    return torch.from_numpy(np.concatenate(out)[:max_tokens]) if out else torch.zeros(0, dtype=torch.long)


def open_data(cfg):
    """``cfg``: the pretraining run's ``data`` section (desmoe.recipes.lm.pretrain.PretrainData)."""
    return StdlibBytes() if cfg.source == "stdlib_bytes" else GeneralCorpus(cfg)


def heldout_batches(stream: torch.Tensor, seq_len: int, micro_batch: int, rank: int, world: int,
                    hint: str = "") -> list[torch.Tensor]:
    """Non-overlapping windows of the held-out stream, the same number of batches on every
    rank (each forward of an EP model is a collective).  ``hint``: the keys to change, for the error."""
    width = seq_len + 1
    windows = [stream[i:i + width] for i in range(0, len(stream) - width + 1, seq_len)]
    per_rank = len(windows) // world // micro_batch * micro_batch
    if per_rank == 0:
        raise UserError(f"held-out text too short: {len(stream)} tokens give fewer than "
                        f"{world * micro_batch} windows of {width} tokens" + (f" ({hint})" if hint else ""))
    mine = windows[rank * per_rank:(rank + 1) * per_rank]
    return [torch.stack(mine[i:i + micro_batch]) for i in range(0, per_rank, micro_batch)]
