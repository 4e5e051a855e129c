"""Tokenizer training on a balanced sample, multiprocess encoding, indexed dataset writing."""
from __future__ import annotations

import io
import multiprocessing as mp
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from desmoe.data.tokenizer import HFTokenizer, SentencePieceTokenizer
from desmoe.errors import UserError

SPECIALS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)


def train_sentencepiece(samples: dict[str, list[str]], cfg, out_dir: Path, seed: int) -> SentencePieceTokenizer:
    """``samples``: domain -> documents, already balanced (equal characters per domain)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for d in sorted(samples) for doc in samples[d] for line in doc.split("\n") if line.strip()]
    model = io.BytesIO()  # no model_prefix: the proto would record the (temporary) output path
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type=cfg.model_type,
            vocab_size=cfg.vocab_size, character_coverage=0.9995, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", "    "], max_sentence_length=16384, shuffle_input_sentence=False,
            input_sentence_size=0, num_threads=1, minloglevel=2, **SPECIALS)
    except RuntimeError as err:
        raise UserError(f"key 'tokenizer.vocab_size': sentencepiece could not train "
                        f"({str(err).splitlines()[-1][:200]}); lower it or add text") from None
    (out_dir / "spm.model").write_bytes(model.getvalue())
    return SentencePieceTokenizer(out_dir / "spm.model")


def copy_hf_tokenizer(path: str, out_dir: Path) -> HFTokenizer:
    tok = HFTokenizer(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.tok.save_pretrained(str(out_dir))
    return HFTokenizer(out_dir)


_WORKER_TOK = None


def _init(kind: str, path: str) -> None:
    global _WORKER_TOK
    _WORKER_TOK = SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)


def _encode(texts: list[str]) -> list[list[int]]:
    return _WORKER_TOK.encode(texts)


def encode_all(tok, texts: Sequence[str], workers: int, progress=None) -> tuple[list[list[int]], dict]:
    """Token ids of every text (order kept), with a throughput measurement."""
    batch = 64
    jobs = [list(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    start = time.perf_counter()
    out: list[list[int]] = []
    if workers <= 1:
        for job in jobs:
            out.extend(tok.encode(job))
            if progress is not None:
                progress.update(len(job))
    else:
        ctx = mp.get_context("spawn")  # fork after torch/threads is unsafe
        with ctx.Pool(workers, initializer=_init, initargs=(tok.kind, str(tok.path))) as pool:
            for ids, job in zip(pool.imap(_encode, jobs, chunksize=4), jobs):
                out.extend(ids)
                if progress is not None:
                    progress.update(len(job))
    seconds = time.perf_counter() - start
    tokens = sum(map(len, out))
    return out, {"tokens": tokens, "seconds": round(seconds, 3), "workers": workers,
                 "tokens_per_s": round(tokens / max(seconds, 1e-9))}


def write_indexed(prefix: Path, docs: Sequence[Sequence[int]], eos_id: int, vocab_size: int,
                  ends: Sequence[int] | None = None) -> None:
    """One megatron-core indexed dataset item (and document) per text, each ending in eos
    (loss masks: ``vocab_size=2``, ``eos_id=1``: stored as uint8; ``ends``: per item instead of ``eos_id``)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = np.uint8 if vocab_size <= 2 else np.uint16 if vocab_size < 65500 else np.int32
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for i, ids in enumerate(docs):
        builder.add_item(torch.tensor([*ids, eos_id if ends is None else ends[i]], dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")


