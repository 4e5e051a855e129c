"""Helpers the desmoe task YAMLs name with ``!function`` (lm-evaluation-harness loads this file)."""


def spaced_choices(doc: dict) -> list[str]:
    """Each choice as the continuation the in-house evaluator scores: a space, then the choice."""
    return [" " + c for c in doc["choices"]]
