"""Tokenizers behind one small interface.

``SentencePieceTokenizer`` wraps the model ``data_prep`` trains (byte fallback,
identity normalisation, so ``decode(encode(x)) == x`` for any text, code
indentation included).  ``HFTokenizer`` wraps a ``transformers`` tokenizer from
a local folder, for fine-tuning an HF model with its own vocabulary.  Both give
``encode(list[str]) -> list[list[int]]``, ``decode``, ``vocab_size`` and the
``bos_id`` / ``eos_id`` / ``pad_id`` the packer and models need.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from desmoe.errors import UserError


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

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
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

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

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
