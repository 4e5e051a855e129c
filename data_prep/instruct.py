"""Instruction form of the source domains: (question, short answer) records from the sources' structure.

A profile's ``instruct`` section names the domains trained in instruction form.  Every document of
such a domain yields its facts (below), each rendered as one prompt/response record (loss on the
response and the closing eos only), in the same split as the document it comes from, so no fact
crosses splits:

- math: the mathematics_dataset ``Question/Answer`` documents (question -> answer) and CHAMP problems
  (problem -> final answer);
- code: a documented callable's description -> its name ("docstring -> function", e.g.
  ``os.path.join``);
- law: a Constitution of India article's title -> its number; a licence's opening text -> its short
  name; a legal term's definition -> the term;
- medicine: an ICD-10-CM diagnosis -> its block (e.g. ``A00-A09``); a definition (HPO, GCIDE) -> the
  term;
- finance: a definition (GnuCash glossary, GCIDE) -> the term.

Answers are short (a name, a code, a number) so that exact match can score them.  Rendering: the
fixed template ``Question: <q>\\nAnswer:`` + ``" <a>"`` for the embedded sentencepiece tokenizer (the
math evaluation's own prompt), the HF tokenizer's chat template (user turn / assistant turn) when
``tokenizer.kind=hf`` has one, the fixed template otherwise.

Mixing (``instruct.domains.<d>``): ``records`` = the domain trains on its instruction records only
(the papers' data are instruction pairs); its ``max_records`` train records are drawn evenly over
the fact kinds, so each is seen several times within a small budget; it is left out of the
per-domain token equalisation (its tokens are its records').  ``mixed`` = the records first, then
the domain's plain documents fill its token budget.
"""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from typing import Callable, Iterator, Optional

from data_prep.extract import Doc
from data_prep.user_data import Chat, Record

MODES = ("records", "mixed")
MAX_ANSWER_CHARS = 40


def _u(*parts) -> float:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _short(answer: str) -> bool:
    return 0 < len(answer) <= MAX_ANSWER_CHARS and "\n" not in answer


_MATH_QA = re.compile(r"\AQuestion: (.+)\nAnswer: ([^\n]+)\Z", re.S)
_ARTICLE = re.compile(r"\AArticle (\w+)\. ")
_RANGE = re.compile(r"\(([A-Z]\d[\dA-Z]-[A-Z]\d[\dA-Z])\)\s*$")


def facts(doc: Doc) -> Iterator[tuple[str, str, str, str]]:
    """(kind, question, answer, the question in a held-out wording) of one document, from its text and
    structured pairs.  The held-out wording is never trained on; it measures whether recall survives
    a rephrased question."""
    m = _MATH_QA.match(doc.text)
    if m and _short(m.group(2).strip()):
        q = m.group(1).strip()
        yield "math-qa", q, m.group(2).strip(), f"Give the answer only. {q}"
    for kind, prompt, answer in doc.pairs:
        if kind == "champ-answer" and _short(answer):
            yield "math-problem", prompt, answer, f"Give the final answer only. {prompt}"
        elif kind == "signature":
            name = prompt.split("(", 1)[0].strip()
            if _short(name) and " " not in name:
                yield ("callable", f"Which Python callable is described by: {answer}", name,
                       f"Name the Python function or class that does this: {answer}")
        elif kind == "definition":
            term = prompt.rstrip(":").strip()
            if _short(term) and len(term.split()) <= 4:
                yield "term", f"Which term is defined as: {answer}", term, f"What word means \"{answer}\"?"
        elif kind == "article-title":
            art = _ARTICLE.match(doc.text)
            if art and answer:
                yield ("article", f"Which article of the Constitution of India is titled \"{answer}\"?", art.group(1),
                       f"The Constitution of India: what is the number of the article \"{answer}\"?")
        elif kind == "licence-name" and _short(answer):
            opening = " ".join(prompt.split()[:40])
            yield ("licence", f"Which licence begins: {opening}", answer,
                   f"Name the licence whose text starts: {opening}")
        elif kind == "icd-block":
            block = _RANGE.search(answer)
            if block:
                yield ("icd-block", f"Which ICD-10-CM block holds the diagnosis \"{prompt}\"?", block.group(1),
                       f"\"{prompt}\": in which block of ICD-10-CM is this diagnosis?")


class Renderer:
    """Question/answer -> (prompt text, response text) with the build's template."""

    def __init__(self, chat: Chat = None) -> None:
        self.chat = chat

    @property
    def name(self) -> str:
        return "chat_template" if self.chat else "question_answer"

    def prompt(self, question: str) -> str:
        if self.chat:
            return self.chat([{"role": "user", "content": question}], True)
        return f"Question: {question}\nAnswer:"

    def segments(self, question: str, answer: str) -> list[tuple[str, bool]]:
        if not self.chat:
            return [(self.prompt(question), False), (f" {answer}", True)]
        head = self.prompt(question)
        full = self.chat([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], False)
        if not full.startswith(head):  # checked like user chats: the mask needs the prompt as a prefix
            from desmoe.errors import UserError
            raise UserError("tokenizer.hf_path: the chat template does not render the prompt as a prefix of the "
                            "whole chat; cannot tell prompt from response tokens")
        return [(head, False), (full[len(head):], True)]


def check_prompt_tokens(tok, rec: Record, ids: list[int]) -> None:
    """The exact-match tasks ask with the prompt encoded alone (as lm-eval's generate_until does): its tokens
    must be the record's first tokens, else the model would be asked with tokens it never trained on (a
    token straddling the prompt/answer seam, e.g. a BPE merge of ":" and " ")."""
    if getattr(rec, "fact", None) is None:
        return
    from desmoe.data.tokenizer import prefixed

    alone = prefixed(tok, [rec.segments[0][0]])[0]  # with the tokenizer's prefix, as the record and the harness
    if ids[: len(alone)] != alone:
        from desmoe.errors import UserError
        raise UserError(f"{rec.origin}: tokenizer {tok.path} encodes the prompt alone ({len(alone)} tokens) other "
                        f"than within the record (a token straddles the prompt/answer seam); the exact-match "
                        f"evaluation would ask with tokens never trained on; expected a tokenizer that splits there")


def records_of(docs: list[Doc], render: Renderer, seed: int, domain: str, limit: Optional[int]) -> list[Record]:
    """The instruction records of ``docs`` (one split of one domain), unique by question, in a seeded
    order that takes the fact kinds in turn; at most ``limit``."""
    by_kind: dict[str, list] = defaultdict(list)
    seen = set()
    for d in docs:
        for kind, q, a, q2 in facts(d):
            if q not in seen:
                seen.add(q)
                by_kind[kind].append((d, q, a, q2))
    queues = [sorted(rows, key=lambda r: _u(seed, "instruct", domain, r[1])) for _, rows in sorted(by_kind.items())]
    out: list[Record] = []
    for i in range(max(map(len, queues), default=0)):
        for kind, queue in zip(sorted(by_kind), queues):
            if i < len(queue) and (limit is None or len(out) < limit):
                d, q, a, q2 = queue[i]
                segs = render.segments(q, a)
                rec = Record("".join(t for t, _ in segs), d.source, d.licence, f"{d.doc_id}~{kind}~{i}",
                             parent=d.parent or d.doc_id, segments=segs, origin=f"{domain}/{d.source}/{d.doc_id}")
                rec.fact = (kind, q, a, q2)
                out.append(rec)
    return out


def instruction_parts(parts: dict[str, dict[str, list[Doc]]], cfg, render: Renderer) -> dict:
    """The splits to tokenize: each instruct domain's records (first), then its plain documents
    when mixed.  ``parts`` itself is unchanged (the MCQ sets are built from the documents)."""
    ic = cfg.instruct
    share = {"train": 1.0, "val": cfg.val_fraction / (1 - cfg.val_fraction - cfg.test_fraction),
             "test": cfg.test_fraction / (1 - cfg.val_fraction - cfg.test_fraction)}
    out = {}
    for name, splits in parts.items():
        mode = ic.domains.get(name)
        if mode is None:
            out[name] = splits
            continue
        out[name] = {}
        for s, docs in splits.items():
            limit = max(1, round(ic.max_records * share[s]))
            recs = records_of(docs, render, cfg.seed, name, limit)
            out[name][s] = recs + (list(docs) if mode == "mixed" else [])
    return out


def exact_items(selected_train: list, render: Renderer, n: int, seed: int, domain: str,
                kinds: Callable[[str], bool] = lambda k: True) -> list[dict]:
    """Closed-book recall items: facts of records trained on, in a seeded order over kinds."""
    by_kind: dict[str, list] = defaultdict(list)
    for d, _ in selected_train:
        fact = getattr(d, "fact", None)
        if fact and kinds(fact[0]):
            by_kind[fact[0]].append((d, fact))
    queues = [sorted(rows, key=lambda r: _u(seed, "exact", domain, r[1][1])) for _, rows in sorted(by_kind.items())]
    items = []
    for i in range(max(map(len, queues), default=0)):
        for queue in queues:
            if i < len(queue) and len(items) < n:
                d, (kind, q, a, q2) = queue[i]
                items.append({"prompt": render.prompt(q), "question": q, "answer": a, "kind": kind,
                              "heldout_prompt": render.prompt(q2), "source": d.source, "doc_id": d.doc_id})
    return items
