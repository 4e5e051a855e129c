"""Cleaning: markup stripping, normalisation, exact and near-duplicate detection.

Near duplicates: MinHash over word 5-gram shingles (64 hash functions, crc32 of
each shingle, so results do not depend on Python's per-process string hashing),
LSH with 16 bands of 4 rows to find candidate pairs, then the estimated Jaccard
similarity must reach the threshold.  Documents are visited in a fixed order and
the first of every near-duplicate group is kept.
"""
from __future__ import annotations

import hashlib
import html
import re
import unicodedata
import zlib
from typing import Iterable, Optional, Sequence

import numpy as np

NUM_PERM, BANDS = 64, 16
_PRIME = np.uint64((1 << 61) - 1)
_rng = np.random.Generator(np.random.PCG64(20240601))
_A = _rng.integers(1, (1 << 61) - 1, NUM_PERM, dtype=np.uint64)
_B = _rng.integers(0, (1 << 61) - 1, NUM_PERM, dtype=np.uint64)


def tidy(text: str) -> str:
    """NFC, no trailing spaces, at most one blank line in a row, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.match(r"(.+?[.;!?])(\s|$)", text)
    return (m.group(1) if m else text).strip()


_ROLE = re.compile(r":[\w:.-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")


def strip_rst(text: str) -> str:
    """reST source -> prose (directive names, roles, heading rules and link targets removed;
    code blocks kept, they are the code)."""
    out = []
    for line in text.split("\n"):
        s = line.strip()
        if re.fullmatch(r"([=\-~^\"'*+#`:.])\1{3,}", s):
            continue                                  # heading under/overlines
        if re.match(r"\.\. (_[^:]+:|index::|highlight::|module::|moduleauthor::|sectionauthor::|"
                    r"versionadded::|versionchanged::|deprecated::|toctree::|currentmodule::|"
                    r"testsetup::|testcleanup::|\|)", s):
            continue
        m = re.match(r"(\s*)\.\. [\w:-]+::\s*(.*)$", line)
        if m:
            line = m.group(1) + m.group(2)            # keep a directive's argument (e.g. a signature)
        elif re.match(r"\s*:[\w-]+:(\s|$)", line):
            continue                                  # field lists / directive options
        line = _ROLE.sub(r"\1", line)
        line = re.sub(r"``([^`]+)``", r"\1", line)
        line = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
        out.append(line.replace("::", ":") if line.rstrip().endswith("::") else line)
    return tidy("\n".join(out))


def strip_xml_text(text: str) -> str:
    """DocBook/XML fragment -> text: comments, tags and entities removed, paragraphs kept."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<\?.*?\?>|<!DOCTYPE.*?>|<!ENTITY[^>]*>", "", text, flags=re.S)
    text = re.sub(r"</?(para|title|listitem|row|entry|glossentry|section|sect\d|simpara)\b[^>]*>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"&[\w.-]+;", lambda m: html.unescape(m.group(0)) if m.group(0) != html.unescape(m.group(0))
                  else "", text)
    text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
    return tidy(re.sub(r"\n{2,}", "\n\n", text))


def exact_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def minhash(text: str, n: int = 5) -> np.ndarray:
    words = text.lower().split()
    if len(words) < n:
        words = words + [""] * (n - len(words))
    shingles = {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
    h = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles))
    return ((h[:, None] * _A[None, :] + _B[None, :]) % _PRIME).min(axis=0)


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


class NearDupIndex:
    """LSH buckets of MinHash signatures; ``add`` returns the kept document it duplicates, if any."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.signatures: list[np.ndarray] = []

    def query(self, sig: np.ndarray, accept=None) -> int | None:
        """The first kept document ``sig`` nearly duplicates (and ``accept(j)`` confirms, when given)."""
        rows = NUM_PERM // BANDS
        seen = set()
        for band in range(BANDS):
            for j in self.buckets.get((band, sig[band * rows:(band + 1) * rows].tobytes()), ()):
                if j not in seen:
                    seen.add(j)
                    if jaccard_estimate(sig, self.signatures[j]) >= self.threshold and (accept is None or accept(j)):
                        return j
        return None

    def add(self, sig: np.ndarray) -> int:
        j = len(self.signatures)
        self.signatures.append(sig)
        rows = NUM_PERM // BANDS
        for band in range(BANDS):
            self.buckets.setdefault((band, sig[band * rows:(band + 1) * rows].tobytes()), []).append(j)
        return j


def dedupe(texts: Sequence[str], threshold: float, protected: Iterable[str] = (),
           responses: Optional[Sequence[Optional[str]]] = None) -> tuple[list[bool], dict]:
    """Keep-mask over ``texts``: drops exact and near duplicates of earlier texts and of any
    ``protected`` text (the held-out set, which must not leak into training).  ``responses``: per text,
    an instruction record's response (what it trains on), else None.  A record is a near duplicate of
    another record only if their responses are near duplicates too: chats that share a long system
    prompt (a tool specification, a persona) are near duplicates as whole texts, yet each one teaches
    its own answer."""
    index, exact = NearDupIndex(threshold), set()
    for t in protected:
        exact.add(exact_key(t))
        index.add(minhash(t))
    n_protected = len(index.signatures)
    kept_resp: list[Optional[np.ndarray]] = [None] * n_protected  # per index entry: its response's signature
    keep, stats = [], {"exact": 0, "near": 0, "heldout": 0}
    for i, t in enumerate(texts):
        key = exact_key(t)
        if key in exact:
            keep.append(False)
            stats["exact"] += 1
            continue
        sig = minhash(t)
        resp = minhash(responses[i]) if responses is not None and responses[i] is not None else None
        accept = None if resp is None else (  # a record: its response must match a record's response too
            lambda j: kept_resp[j] is None or jaccard_estimate(resp, kept_resp[j]) >= threshold)
        hit = index.query(sig, accept)
        if hit is not None:
            keep.append(False)
            stats["heldout" if hit < n_protected else "near"] += 1
            continue
        exact.add(key)
        index.add(sig)
        kept_resp.append(resp)
        keep.append(True)
    return keep, stats


def chunk(text: str, max_chars: int) -> list[str]:
    """Cut at paragraph boundaries into pieces of at most ~max_chars (a longer paragraph stays whole
    up to 2x, then is cut at line ends)."""
    if len(text) <= max_chars:
        return [text]
    pieces, cur = [], ""
    for para in text.split("\n\n"):
        while len(para) > 2 * max_chars:
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip("\n")
        if cur and len(cur) + len(para) + 2 > max_chars:
            pieces.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        pieces.append(cur)
    return [p.strip() for p in pieces if p.strip()]
