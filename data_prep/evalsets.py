"""Exact-answer evaluation sets built from the sources' structure.

Multiple choice: every ``(kind, prompt, answer)`` pair of a document in the
chosen split becomes an item whose distractors are the answers of other pairs
of the same kind in the same domain (term -> definition, signature ->
description, article text -> title, diagnosis -> ICD-10-CM block, licence text
-> licence name).  Items are scored by the log-likelihood of each choice.
Math: mathematics_dataset questions from its interpolation regime with a
different seed, dropped when the question also appears in training.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path


def mcq_items(pairs: list[tuple[str, str, str, str, str]], n: int, choices: int, seed: int) -> list[dict]:
    """``pairs``: (kind, prompt, answer, source, document id) of one domain, in a fixed order."""
    rng = random.Random(seed)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for kind, _, answer, _, _ in pairs:
        if answer not in by_kind[kind]:
            by_kind[kind].append(answer)
    usable = [p for p in pairs if len(by_kind[p[0]]) >= choices and p[0] != "champ-answer"]
    seen, items = set(), []
    for kind, prompt, answer, source, doc in rng.sample(usable, len(usable)):
        if (prompt, answer) in seen:
            continue
        seen.add((prompt, answer))
        others = [a for a in by_kind[kind] if a != answer]
        options = rng.sample(others, choices - 1) + [answer]
        rng.shuffle(options)
        items.append({"prompt": prompt, "choices": options, "answer": options.index(answer), "source": source,
                      "doc_id": doc})
        if len(items) >= n:
            break
    return items


def write_eval_sets(root: Path, cfg, selected, parts, ctx, render) -> dict:
    """The evaluation files of a prepared folder (eval/mcq-<domain>.jsonl, eval/math.jsonl,
    eval/exact-<domain>.jsonl for instruct domains) and their index."""
    from data_prep.instruct import exact_items

    ev: dict = {"mcq": {}, "exact": {}, "notes": {}}
    (root / "eval").mkdir(parents=True, exist_ok=True)
    for name in cfg.domains:
        split_docs = [d for d, _ in selected[(name, "train")]] if cfg.eval.mcq_split == "train" \
            else parts[name][cfg.eval.mcq_split]
        pairs = [(k, p, a, d.source, d.parent or d.doc_id) for d in split_docs for k, p, a in d.pairs]
        items = mcq_items(pairs, cfg.eval.mcq_per_domain, cfg.eval.choices, cfg.seed)
        if items:
            _jsonl(root / "eval" / f"mcq-{name}.jsonl", items)
            ev["mcq"][name] = f"eval/mcq-{name}.jsonl"
    for name in cfg.instruct.domains:
        items = exact_items(selected[(name, "train")], render, cfg.instruct.exact_per_domain, cfg.seed, name)
        if items:
            _jsonl(root / "eval" / f"exact-{name}.jsonl", items)
            ev["exact"][name] = f"eval/exact-{name}.jsonl"
            # chance: the best constant answer (the train records' most frequent one) scored on the items
            common = Counter(d.fact[2] for d, _ in selected[(name, "train")] if hasattr(d, "fact")).most_common(1)
            ev.setdefault("exact_chance", {})[name] = sum(it["answer"] == common[0][0] for it in items) / len(items)
    if ev["exact"]:
        ev["notes"]["exact"] = (f"closed-book recall of facts trained on (instruction records of the train split, "
                                f"{render.name} template); greedy answer, exact match after normalisation")
    math_rows, note = [], ""
    if cfg.mathgen.enabled:
        from data_prep.mathgen import generate
        trained = {d.text for n in cfg.domains for d, _ in selected[(n, "train")]}
        asked = {d.fact[1] for n in cfg.domains for d, _ in selected[(n, "train")] if hasattr(d, "fact")}
        for r in generate(ctx, "interpolate", cfg.mathgen.per_module_eval, cfg.seed + 1):
            if f"Question: {r['question']}\nAnswer: {r['answer']}" not in trained and r["question"] not in asked:
                math_rows.append(r)
        note = "mathematics_dataset 1.0.1 (DeepMind generator), interpolation regime, seed+1; exact match"
    else:
        for d in parts.get("math", {}).get("test", []):
            math_rows += [{"question": p, "answer": a, "module": "champ"} for k, p, a in d.pairs
                          if k == "champ-answer"]
        note = "CHAMP competition problems of the test split with their exact answers (generator disabled)"
    _jsonl(root / "eval" / "math.jsonl", math_rows)
    ev["math"], ev["notes"]["math"] = "eval/math.jsonl", note
    ev["notes"]["mcq"] = (f"{cfg.eval.choices}-way multiple choice from structured records of "
                          f"'{cfg.eval.mcq_split}' documents; distractors are other answers of the same kind")
    return ev


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
