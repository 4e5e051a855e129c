"""Tokenizers users bring, built offline in a second each with the ``tokenizers`` library on stdlib
docstrings: Llama/Mistral style (BPE, byte fallback, Metaspace ``prepend_scheme`` first / always, or the
legacy ``Prepend("\u2581")`` normaliser; ``llama-bos``: a ``TemplateProcessing`` post-processor that puts
``<s>`` before every encoding, as Llama/Mistral/Mixtral's tokenizer.json does), GPT-2 byte-level
(``add_prefix_space`` off / on), Qwen style (NFC, its split regex, byte-level), and the project's own
sentencepiece as data_prep trains it."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

# the tokenizers are trained on one thread: the module's few-second build once took 16 minutes on the shared
# 2-core box at load 26 (cause not established; rayon's spinning workers are the likely one); the same
# tokenizers either way
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from instructfix import TEMPLATE, docstrings

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
HF_KINDS = ("metaspace-first", "metaspace-always", "llama-legacy", "llama-bos", "gpt2", "qwen")


def texts() -> list[str]:
    """Docstrings, also as paragraphs joined by blank lines (so that "\n\n" is a merge, as in real vocabularies)."""
    docs = [a for _, a in docstrings()]
    return docs + ["\n\n".join(docs[i:i + 3]) for i in range(0, len(docs), 3)]


def hf_folder(kind: str, out: Path, vocab: int = 800) -> Path:
    """An HF tokenizer folder (tokenizer.json + tokenizer_config.json with a chat template) of ``kind``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    if kind in ("metaspace-first", "metaspace-always", "llama-legacy", "llama-bos"):
        tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        if kind == "llama-legacy":  # Llama 2's tokenizer.json: no pre-tokenizer, a "\u2581" before every text
            tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        else:
            scheme = "first" if kind == "llama-bos" else kind.split("-")[1]
            tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        # transformers 5 rebuilds a LlamaTokenizer's pre-tokenizer (Metaspace, prepend_scheme first): the other
        # variants are saved as PreTrainedTokenizerFast, which loads tokenizer.json as it is
        specials = SPECIAL + [f"<0x{i:02X}>" for i in range(256)]
        cls = LlamaTokenizerFast if kind == "metaspace-first" else PreTrainedTokenizerFast
        alphabet = []
    else:
        tk = Tokenizer(models.BPE())
        if kind == "qwen":
            tk.normalizer = normalizers.NFC()
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])
        else:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=kind == "gpt2-prefix")
        tk.decoder = decoders.ByteLevel()
        specials, cls, alphabet = SPECIAL, PreTrainedTokenizerFast, pre_tokenizers.ByteLevel.alphabet()
    tk.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
    if kind == "llama-bos":
        from tokenizers import processors

        bos = ("<s>", tk.token_to_id("<s>"))
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos])
    tok = cls(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


def sentencepiece(out: Path):
    """The project's own tokenizer, trained by data_prep's code (identity normalisation, byte fallback and
    sentencepiece's default add_dummy_prefix, as the demo's)."""
    from data_prep.tokens import train_sentencepiece

    return train_sentencepiece({"docs": texts()}, SimpleNamespace(model_type="unigram", vocab_size=600), out, 0)


def token_spans(tok, ids: list[int], text: str) -> list:
    """The characters each token adds, read off decoding growing prefixes (independent of the tokenizer's
    offsets): [start, end), or None for a byte of a character not complete yet (the next token's span)."""
    spans, done = [], 0
    for i in range(len(ids)):
        got = tok.decode(ids[: i + 1])
        if not text.startswith(got) or "\ufffd" in got[done:]:
            spans.append(None)
            continue
        spans.append((done, len(got)))
        done = len(got)
    return spans


def oracle_mask(tok, ids: list[int], segments: list[tuple[str, bool]]) -> list[int]:
    """1 for a token covering a response character; a token adding no character goes with the character
    after it (a lone word-start mark), a leading byte of a character with the token that completes it."""
    text = "".join(t for t, _ in segments)
    flags = [c for t, c in segments for _ in t]
    out: list = [None if s is None else int(any(flags[s[0]:s[1]])) if s[1] > s[0] else int(flags[min(s[0], len(text) - 1)])
                 for s in token_spans(tok, ids, text)]
    for i in range(len(out) - 1, -1, -1):
        if out[i] is None:
            out[i] = out[i + 1]
    return out
