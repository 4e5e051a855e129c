"""Tokenizers behind one small interface.

``SentencePieceTokenizer`` wraps the model ``data_prep`` trains (byte fallback,
identity normalisation, so ``decode(encode(x)) == x`` for any text, code
indentation included).  ``HFTokenizer`` wraps a ``transformers`` tokenizer from
a local folder, for fine-tuning an HF model with its own vocabulary.  Both give
``encode(list[str]) -> list[list[int]]``, ``decode``, ``vocab_size`` and the
``bos_id`` / ``eos_id`` / ``pad_id`` the packer and models need.

Pieces of one text (prompt and response, context and continuation) are never encoded apart: most
tokenizers mark a word start at the beginning of every encoded text (sentencepiece's dummy prefix, an
HF Metaspace pre-tokenizer, Llama's legacy ``Prepend("▁")``, ByteLevel's ``add_prefix_space``), and
BPE merges across a seam (``"\\n\\n"``, ``" word"``), so the concatenation of two encodings is not the
encoding the model sees for the text (the demo's sentencepiece put a lone ``"▁"`` before every
answer).  ``spans`` gives the ids of a whole text with the characters each token covers, from which
``data_prep.user_data.encode_record`` cuts loss masks; ``encode_pairs`` splits a whole encoding into
context and continuation as lm-evaluation-harness's HF model does.

``prefix`` is what the tokenizer's default encoding puts before every text (Llama/Mistral/Mixtral-style
post-processors: ``[bos]``; GPT-2/Qwen/SmolLM2 and desmoe's own sentencepiece: nothing).  A model whose base
was pretrained with it at position 0 degrades without it, and lm-eval's HF model feeds it, so training data,
the harness adapter and the in-house evaluators all start a standalone text with it (``lead`` / ``prefixed``);
``encode`` and ``spans`` stay the bare text.  ``prefix_id`` is the token before an empty context and a rolling
window (lm-eval's ``prefix_token_id``: bos when the tokenizer defines one, else eos).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from desmoe.errors import UserError

# texts whose default encodings show what a tokenizer adds around a text (a word, punctuation, edge whitespace)
PROBES = ("a", "Hello, world.", " x\n\ny ")


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(model_file)
        if not self.path.is_file():
            raise UserError(f"{self.path}: sentencepiece model not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id, self.eos_id = int(self.sp.bos_id()), int(self.sp.eos_id())
        self.pad_id = int(self.sp.pad_id()) if self.sp.pad_id() >= 0 else self.eos_id
        # data_prep trains with the defaults add_dummy_prefix and escape_whitespaces: every encoded text starts
        # a word ("\u2581"), spaces become "\u2581".  Read off the model's own output (its proto needs protobuf)
        probe = "".join(self.sp.encode("a a", out_type=str))
        self.dummy_prefix, self.escape = probe.startswith("\u2581"), "a\u2581a" in probe
        # data_prep trains it with a bos piece (id 1) that nothing adds, and the demo base was pretrained
        # without it (documents separated by eos only): no prefix, and end-of-text starts a text
        self.prefix: list[int] = []
        self.prefix_id, self.prefix_text = self.eos_id, ""

    def spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of ``text`` and the [start, end) characters of ``text`` each one covers.  sentencepiece's
        own offsets are coarse (a whitespace run's pieces share one span), so the pieces are walked over
        the normalised text (identity normalisation: the dummy prefix, spaces as "▁"); a byte-fallback
        piece covers its character.  A dummy-prefix piece alone covers nothing: (0, 0)."""
        ids = self.encode([text])[0]
        lead = "▁" if self.dummy_prefix and text else ""
        norm = lead + (text.replace(" ", "▁") if self.escape else text)
        pos, pend, out = 0, 0, []
        for i in ids:
            if self.sp.is_byte(i) and pos < len(norm):  # one UTF-8 byte of the character at pos
                out.append((pos, pos + 1))
                pend += 1
                if pend == len(norm[pos].encode()):
                    pos, pend = pos + 1, 0
                continue
            piece = self.sp.id_to_piece(i)
            if pend or norm[pos:pos + len(piece)] != piece:
                raise UserError(f"{self.path}: its pieces do not spell the text at character {pos - len(lead)} "
                                f"(piece {piece!r}; expected identity normalisation, as data_prep trains)")
            out.append((pos, pos + len(piece)))
            pos += len(piece)
        if pos != len(norm):
            raise UserError(f"{self.path}: its pieces cover {pos - len(lead)} of {len(text)} characters")
        return ids, [(max(a - len(lead), 0), max(b - len(lead), 0)) for a, b in out]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """``skip_special``: accepted for the HF wrapper's sake; sentencepiece drops control pieces anyway."""
        return self.sp.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


class HFTokenizer:
    kind = "hf"

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: HF tokenizer folder not found")
        # transformers 5 builds an empty tokenizer from a folder without these instead of failing
        if not any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                                        "vocab.txt", "tokenizer_config.json")):
            raise UserError(f"{self.path}: no tokenizer files (expected tokenizer.json, tokenizer.model, "
                            f"vocab.json or vocab.txt)")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"{self.path}: not a loadable HF tokenizer ({str(err).splitlines()[0]})") from None
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        if eos is None:
            raise UserError(f"{self.path}: the HF tokenizer defines no eos token")
        self.eos_id = int(eos)
        self.bos_id = int(self.tok.bos_token_id) if self.tok.bos_token_id is not None else self.eos_id
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos_id
        self.prefix = self._default_prefix()
        self.prefix_text = self.tok.decode(self.prefix) if self.prefix else ""
        self.prefix_id = self.bos_id  # lm-eval's HFLM.prefix_token_id: bos if the tokenizer defines one, else eos

    def _default_prefix(self) -> list[int]:
        """The ids the tokenizer's default encoding (``add_special_tokens=True``, what ``tok(text)``, lm-eval and
        pretraining pipelines use) puts before the text; refused when it appends any (an eos after every
        context would end a causal LM's prompt) or differs between texts."""
        seen = set()
        for text in PROBES:
            full = list(self.tok(text)["input_ids"])
            bare = list(self.tok(text, add_special_tokens=False)["input_ids"])
            at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
            if at is None:
                raise UserError(f"{self.path}: its default encoding of {text!r} ({full}) does not contain its encoding "
                                f"without special tokens ({bare}); expected special tokens added around the text only")
            seen.add((tuple(full[:at]), tuple(full[at + len(bare):])))
        if len(seen) != 1:
            raise UserError(f"{self.path}: its default encoding adds different special tokens to different texts "
                            f"({sorted(seen)}); expected the same ones before every text")
        prefix, suffix = seen.pop()
        if suffix:
            raise UserError(f"{self.path}: its default encoding appends {self.tok.convert_ids_to_tokens(list(suffix))} "
                            f"to every text, so a causal LM's context would end in it; expected nothing after the "
                            f"text (e.g. \"add_eos_token\": false in tokenizer_config.json)")
        return list(prefix)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of ``text`` (as ``encode``) and the [start, end) characters each covers (the fast
        tokenizer's offsets, into the text as given)."""
        if not self.tok.is_fast:
            raise UserError(f"{self.path}: instruction records need a fast HF tokenizer (tokenizer.json) for "
                            f"character offsets; got {type(self.tok).__name__}")
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for f in sorted(self.path.glob("*")):
            if f.is_file() and f.suffix in (".json", ".model", ".txt"):
                digest.update(f.name.encode() + f.read_bytes())
        return digest.hexdigest()


def load_tokenizer(spec: dict[str, Any], root: str | Path) -> SentencePieceTokenizer | HFTokenizer:
    """``spec`` is the ``tokenizer`` entry of a prepared data folder's ``meta.json``."""
    path = Path(spec["path"])
    path = path if path.is_absolute() else Path(root) / path
    return SentencePieceTokenizer(path) if spec["kind"] == "sentencepiece" else HFTokenizer(path)


def lead(tok, text: str) -> list[int]:
    """The ids before ``text``'s own tokens when it stands alone (a document, a record, a prompt, a context):
    the tokenizer's ``prefix``, except for a text that already starts with the prefix's text (a chat template
    that renders ``<s>``, which ``encode`` gives as the token): lm-eval's ``has_bos_prefix`` rule."""
    return [] if not tok.prefix or text.startswith(tok.prefix_text) else list(tok.prefix)


def prefixed(tok, texts: Sequence[str]) -> list[list[int]]:
    """The ids a model sees for each text standing alone: ``lead`` then ``encode``; what the tokenizer's
    default encoding and lm-eval's HF model (``tok_encode``, ``tok_batch_encode``) give."""
    texts = list(texts)
    return [lead(tok, t) + list(ids) for t, ids in zip(texts, tok.encode(texts))]


def generation_prompts(tok, texts: Sequence[str], max_len: int, budget: int) -> tuple[list[list[int]], int]:
    """The prompts a model sees before generating ``budget`` tokens within ``max_len``, and how many were cut:
    ``prefixed``, then cut from the left to leave the answer its room, as lm-eval's HF model does
    (``tok_batch_encode(left_truncate_len=max_length - max_gen_toks)``; a cut prompt loses its BOS there too).
    Callers refuse ``budget >= max_len`` in their own terms first: no prompt would be left."""
    if not 0 <= budget < max_len:
        raise ValueError(f"a generation budget of {budget} tokens leaves no prompt in max_len={max_len}")
    keep, full = max_len - budget, prefixed(tok, texts)
    return [p[-keep:] for p in full], sum(len(p) > keep for p in full)


def encode_pairs(tok, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) whose concatenation is the encoding of the whole text, the way
    lm-evaluation-harness's HF model encodes a pair: a context's trailing whitespace moves to the
    continuation, context + continuation is encoded whole (with the tokenizer's prefix, ``prefixed``), and the
    continuation is what follows the context's own encoding.  An empty context is lm-eval's too: the prefix
    token (``prefix_id``) before the continuation's bare encoding, or that encoding's own first token when it
    is the prefix token.  Two deliberate departures, where the harness's numbers are no measurement: where a
    token straddles the seam (the context's encoding is not a prefix of the whole one, e.g. "cat" + "s" ->
    " cats"), the context is cut to the tokens both agree on, so the straddling token is scored as continuation
    rather than dropped (the harness would score nothing: log-likelihood 0); a whitespace-only context of a
    tokenizer without a prefix is the prefix token (the harness scores the continuation without its first
    token)."""
    ctx, cont = [], []
    for c, x in zip(contexts, continuations):
        n = len(c) - len(c.rstrip())
        ctx.append(c[:len(c) - n])
        cont.append(c[len(c) - n:] + x)
    empty = [i for i, c in enumerate(contexts) if not c]
    bare = dict(zip(empty, tok.encode([cont[i] for i in empty]) if empty else []))
    out = []
    for i, (whole, alone, x) in enumerate(zip(prefixed(tok, [c + x for c, x in zip(ctx, cont)]), prefixed(tok, ctx),
                                              cont)):
        if i in bare:
            ids = list(bare[i])
            out.append(([tok.prefix_id], ids) if not ids or ids[0] != tok.prefix_id else (ids[:1], ids[1:]))
            continue
        k = 0
        while k < min(len(alone), len(whole)) and alone[k] == whole[k]:
            k += 1
        if k == len(whole) and x and k:  # a continuation absorbed into the context's last token: score that token
            k -= 1
        out.append((list(whole[:k]) or [tok.prefix_id], list(whole[k:])))
    return out
