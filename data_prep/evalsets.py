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

import random
from collections import defaultdict


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
