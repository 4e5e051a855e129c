"""A prepared multi-domain data folder, as ``python -m data_prep.build`` writes it.

    data = PreparedData("data/tiny")
    data.domains              # ['math', 'code', 'law', 'medicine', 'finance', 'general']
    data.tokenizer.encode(["some text"])
    for batch in data.batches("train", micro_batch=8, seq_len=256, seed=0, rank=r, world=w):
        batch.inputs, batch.labels, batch.domain, batch.token_domain
    evals = data.eval_sets()  # mcq / math exact-answer tasks, held-out text per domain, held-out general

Layout (all paths relative to the root): ``meta.json`` (the index), ``raw/<domain>/<split>.parquet``
(fields text, domain, source, licence, doc_id), ``tokenizer/``, ``indexed/<domain>/<split>.{bin,idx}``
(megatron-core indexed datasets, one document per item, each ending in ``eos``), ``eval/*.jsonl``,
``DATA_CARD.md``.  Domains with instruction records (listed in ``meta["loss_masks"]``) also have
``indexed/<domain>/<split>.mask.{bin,idx}``: a uint8 loss mask per token, item for item (1 = the label
counts); other domains, and folders built before masks existed, count every label.  A tokenizer whose
default encoding starts with BOS (``meta["tokenizer"]["prefix"]``) starts every document with it, and
its label never counts (docs/data.md, "BOS").
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from desmoe import integrity
from desmoe.data.packing import DomainBatch, DomainSampler
from desmoe.data.tokenizer import load_tokenizer
from desmoe.errors import UserError

FORMAT = 1
SPLITS = ("train", "val", "test")
# meta.json's ``record_encoding`` in a folder with loss masks: its records are the encoding of their whole
# text (data_prep.user_data.encode_record).  Folders built before it tokenized prompt and response apart
# (the demo's sentencepiece: a lone "\u2581" before every answer); only they lack the key, so they are
# refused rather than trained on; folders without records are unchanged.
RECORD_ENCODING = "whole-text"


def fingerprint(root: str | Path) -> str:
    """sha256 of a prepared folder's data: its sealed manifest (every file's size and sha256) without
    ``timing.json``, the one file identical builds differ in; of ``meta.json`` in an unsealed folder.
    Equal for a byte-identical rebuild, different when any data file changed (e.g. records re-encoded),
    so what was computed from a folder (a finished run) can tell whether it still holds."""
    root = Path(root)
    manifest = root / integrity.MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        files.pop("timing.json", None)
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256((root / "meta.json").read_bytes()).hexdigest()


def shipped_tokenizer_differs(folder: str | Path, root: str | Path) -> Optional[str]:
    """Why ``folder`` (a model export) was built with another tokenizer than the prepared folder ``root``:
    an export of the embedded base ships the data's sentencepiece model (``tokenizer.model``), and a data
    folder rebuilt with a retrained tokenizer keeps the vocabulary size, so nothing else would notice that
    the base learnt other token ids.  None when they agree or either side has nothing to compare."""
    shipped, meta = Path(folder) / "tokenizer.model", Path(root) / "meta.json"
    if not (shipped.is_file() and meta.is_file()):
        return None
    want = json.loads(meta.read_text()).get("tokenizer") or {}
    got = integrity.sha256_file(shipped)
    if want.get("kind") != "sentencepiece" or got == want.get("sha256"):
        return None
    return (f"{shipped} (sha256 {got[:12]}) is not the tokenizer of {root} (sha256 {str(want.get('sha256'))[:12]}): "
            f"the model was trained on other token ids")


@dataclass
class MCQItem:
    prompt: str
    choices: list[str]
    answer: int          # index into choices
    source: str = ""
    doc_id: str = ""     # the (never trained on) document the item comes from


@dataclass
class MathItem:
    question: str
    answer: str          # exact-match target
    module: str = ""


@dataclass
class EvalSets:
    mcq: dict[str, list[MCQItem]]             # domain -> multiple-choice items (log-likelihood scoring)
    math: list[MathItem]                      # exact-answer Q/A
    heldout_text: dict[str, list[str]]        # domain -> test-split documents (perplexity)
    heldout_general: list[str]                # never trained on (forgetting)
    notes: dict[str, str] = field(default_factory=dict)


class PreparedData:
    def __init__(self, root: str | Path, verify_hashes: bool = False) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{self.root}: not a prepared data folder (no meta.json); "
                            f"build one with `python -m data_prep.build --profile tiny --out {self.root}`")
        integrity.verify(self.root, "prepared data folder", hashes=verify_hashes)
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{meta_path}: not valid JSON") from None
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT}; rebuild it")
        if self.meta.get("loss_masks") and self.meta.get("record_encoding") != RECORD_ENCODING:
            raise UserError(f"{meta_path}: key 'record_encoding': {self.meta.get('record_encoding')!r}, expected "
                            f"'{RECORD_ENCODING}' (instruction records tokenized piece by piece); rebuild it with "
                            f"{self._rebuild_command()}")
        self.domains: list[str] = list(self.meta["domains"])
        self.heldout_name: str = self.meta["heldout"]
        self.card = self.root / self.meta["card"]
        self._tokenizer = None
        self._indexed: dict[tuple[str, str], object] = {}
        self.masked: list[str] = list(self.meta.get("loss_masks", []))  # absent in older folders: none

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok = load_tokenizer(self.meta["tokenizer"], self.root)
            self.check_tokenizer(tok)
            self.check_prefix(tok)
            self._tokenizer = tok
        return self._tokenizer

    def check_prefix(self, tok) -> None:
        """Refuse data whose documents do not start with what the tokenizer puts before every text (its BOS):
        a folder built before desmoe added it would fine-tune a Llama-style base on sequences without the BOS
        it was pretrained with, and evaluate it on others (``meta["tokenizer"]["prefix"]``, absent: none)."""
        want = [int(i) for i in self.meta["tokenizer"].get("prefix", [])]
        if list(tok.prefix) != want:
            raise UserError(f"{self.root / 'meta.json'}: key 'tokenizer.prefix': {want if want else 'absent'}, "
                            f"expected {list(tok.prefix)} (tokenizer {tok.path} starts every text with it: its BOS); "
                            f"rebuild it with {self._rebuild_command()}")

    def _rebuild_command(self) -> str:
        """The build command that reproduces the recorded config (a built-in profile and the tokenizer's keys),
        else how to find what it was built with: a profile file or other overrides are not recorded as such."""
        import dataclasses

        from data_prep.config import PROFILES, load_profile

        cfg, profile = self.meta.get("config") or {}, str(self.meta.get("profile"))
        hf = (cfg.get("tokenizer") or {}).get("hf_path")
        extra = ["tokenizer.kind=hf", f"tokenizer.hf_path={hf}"] if hf else []
        if (PROFILES / f"{profile}.yaml").is_file():  # one of data_prep/profiles
            built_in = dataclasses.asdict(load_profile(profile, extra))
            built_in.pop("workers", None)  # not recorded: it cannot change the output
            if json.loads(json.dumps(built_in, default=str)) == cfg:
                return " ".join(["python -m data_prep.build --profile", profile, "--out", str(self.root), *extra])
        return (f"python -m data_prep.build --out {self.root} and the profile and overrides it was built with "
                f"(its meta.json 'config' records them: profile '{profile}')")

    @property
    def prefix_len(self) -> int:
        """How many tokens every document starts with (the tokenizer's BOS; 0 without one), whose labels
        never count (``DomainSampler(prefix_len=...)``); refuses data built without the tokenizer's prefix."""
        if self.meta["tokenizer"]["kind"] != "sentencepiece":  # desmoe's own sentencepiece never has one
            self.tokenizer  # noqa: B018 - loading it runs check_prefix
        return len(self.meta["tokenizer"].get("prefix", []))

    def check_tokenizer(self, tok) -> None:
        """Refuse a tokenizer other than the one the indexed data was built with."""
        want = self.meta["tokenizer"]
        if tok.vocab_size != want["vocab_size"] or tok.fingerprint() != want["sha256"]:
            raise UserError(f"tokenizer {tok.path} (vocab {tok.vocab_size}, sha256 {tok.fingerprint()[:12]}) does "
                            f"not match the indexed data in {self.root} (built with vocab {want['vocab_size']}, "
                            f"sha256 {want['sha256'][:12]}); rebuild the data with this tokenizer")

    def domain_id(self, name: str) -> int:
        if name not in self.domains:
            raise UserError(f"unknown domain '{name}' (this data has: {', '.join(self.domains)})")
        return self.domains.index(name)

    def indexed(self, domain: str, split: str, mask: bool = False):
        """The megatron-core ``IndexedDataset`` of one domain and split (the held-out set has only 'test');
        ``mask=True``: its loss masks (only for domains in ``self.masked``)."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if split not in SPLITS:
            raise UserError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
        if domain != self.heldout_name:
            self.domain_id(domain)
        key = (domain, split + (".mask" if mask else ""))
        if key not in self._indexed:
            prefix = self.root / "indexed" / domain / key[1]
            if not Path(str(prefix) + ".idx").is_file():
                raise UserError(f"{prefix}.idx: no indexed data for domain '{domain}', split '{split}'")
            self._indexed[key] = IndexedDataset(str(prefix), multimodal=False, mmap=True)
        return self._indexed[key]

    def raw(self, split: str, domain: Optional[str] = None):
        """Cleaned text as an HF ``datasets.Dataset`` (fields text, domain, source, licence, doc_id)."""
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = [domain] if domain else [*self.domains, self.heldout_name]
        files = [self.root / "raw" / d / f"{split}.parquet" for d in names]
        tables = [pq.read_table(f) for f in files if f.is_file()]
        if not tables:
            raise UserError(f"{self.root}/raw: no '{split}' text for {', '.join(names)}")
        return datasets.Dataset(pa.concat_tables(tables))

    def batches(self, split: str, micro_batch: int, seq_len: int, seed: int, rank: int, world: int,
                step: int = 0, domains: Optional[Sequence[str]] = None, homogeneous: bool = True,
                weights: Optional[dict[str, float]] = None) -> Iterator[DomainBatch]:
        """Endless packed batches starting at ``step``; see :mod:`desmoe.data.packing`."""
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} outside world size {world}")
        if micro_batch < 1 or seq_len < 1:
            raise UserError(f"micro_batch and seq_len must be positive, got {micro_batch}, {seq_len}")
        names = list(domains) if domains else self.domains
        ids = {self.domain_id(d): self.indexed(d, split) for d in names}
        if weights is not None:
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise UserError(f"weights: unknown domain '{unknown[0]}' (expected one of {', '.join(names)})")
            w = {self.domain_id(d): float(weights.get(d, 0.0)) for d in names}
            if sum(w.values()) <= 0 or min(w.values()) < 0:
                raise UserError(f"weights: expected non-negative numbers with a positive sum, got {weights}")
        else:
            w = None
        masks = {self.domain_id(d): self.indexed(d, split, mask=True) for d in names if d in self.masked}
        sampler = DomainSampler(ids, w, split_key=split, masks=masks, prefix_len=self.prefix_len)
        return sampler.iterate(micro_batch, seq_len, seed, rank, world, step, homogeneous)

    def eval_sets(self) -> EvalSets:
        ev = self.meta["eval"]
        mcq = {d: [MCQItem(**r) for r in _jsonl(self.root / p)] for d, p in ev["mcq"].items()}
        math = [MathItem(**r) for r in _jsonl(self.root / ev["math"])]
        text = {d: list(self.raw("test", d)["text"]) for d in self.domains}
        general = list(self.raw("test", self.heldout_name)["text"])
        return EvalSets(mcq, math, text, general, dict(ev.get("notes", {})))


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: evaluation file missing; rebuild the data folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
