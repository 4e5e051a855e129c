"""The data card's budget line says what the budget was for the folder (data_prep/card.py)."""
from __future__ import annotations

import json

from instructfix import docstrings, hf_tokenizer


def test_equalize_off_does_not_claim_equal_budgets(tmp_path):
    from data_prep.build import build

    texts = [a for _, a in docstrings()]
    folder = tmp_path / "mine"
    # a user's big domain and small one (real text: stdlib docstrings), no equalisation
    for d, part in (("big", texts[:50]), ("small", texts[50:70]), ("heldout", texts[70:])):
        (folder / d).mkdir(parents=True)
        (folder / d / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    cfg = {"profile": "uneven", "seed": 5, "domains": {"big": [], "small": []}, "heldout": "heldout",
           "budget_tokens": 100000, "equalize": False, "val_fraction": 0.2, "test_fraction": 0.2, "workers": 1,
           "min_chars": 20, "user_data": str(folder), "mathgen": {"enabled": False},
           "tokenizer": {"kind": "hf", "hf_path": str(hf_tokenizer(tmp_path / "tok", texts))}}
    (tmp_path / "p.yaml").write_text(json.dumps(cfg))
    meta = build(str(tmp_path / "p.yaml"), tmp_path / "out", cache=tmp_path / "cache", quiet=True)
    train = {d: meta["counts"][d]["train"]["tokens"] for d in ("big", "small")}
    assert train["small"] < train["big"] < 100000  # the budget is a cap no domain reaches: not equal
    card = (tmp_path / "out" / "DATA_CARD.md").read_text()
    assert "equal for every domain" not in card  # before: "100,000 tokens (equal for every domain)"
    assert ("Train budget per domain: 100,000 tokens (a cap per domain: equalize is off, so a domain with less text "
            "has fewer tokens (see the table)).") in card
