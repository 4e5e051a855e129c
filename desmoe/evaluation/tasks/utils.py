"""Helpers the desmoe task YAMLs name with ``!function`` (lm-evaluation-harness loads this file)."""


def spaced_choices(doc: dict) -> list[str]:
    """Each choice as the continuation the in-house evaluator scores: a space, then the choice."""
    return [" " + c for c in doc["choices"]]


def normalise(text: str) -> str:
    """The exact-match normalisation (docs/evaluation.md): first line, surrounding whitespace and one
    trailing period dropped, whitespace runs collapsed, case folded."""
    line = text.strip().split("\n", 1)[0].strip()
    if line.endswith("."):
        line = line[:-1].rstrip()
    return " ".join(line.split()).casefold()


def exact_match(doc: dict, results: list[str]) -> dict:
    """1.0 when the greedy answer equals the reference after ``normalise``."""
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
