"""The eos the build closes every record with counts in the loss only after the record's whole response:
a record cut to ``max_record_tokens`` (or to the budget) or ending in a user turn trained the model to
emit end-of-text in the middle of an answer, or right after a question."""
from __future__ import annotations

import json

from instructfix import docstrings, hf_tokenizer, profile, records, user_folder


def test_the_closing_eos_counts_only_after_a_whole_response(tmp_path):
    from data_prep.build import build
    from desmoe.data import PreparedData

    folder = user_folder(tmp_path)
    recs, prose = records()
    trailing = [{"messages": [{"role": "user", "content": f"What is {q}?"}, {"role": "assistant", "content": f"See {q}."},
                              {"role": "user", "content": "Thanks."}]} for q, _ in docstrings()[-30:]]
    (folder / "qa" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs["chat.jsonl"] + trailing))
    tok = hf_tokenizer(tmp_path / "hf", [json.dumps(r) for rows in recs.values() for r in rows] + prose)
    # 90 tokens: many responses are cut, some are whole
    prof = profile(tmp_path, folder, tok, budget_tokens=10 ** 6, equalize=False, max_record_tokens=90)
    build(str(prof), tmp_path / "out", cache=tmp_path / "cache", quiet=True)
    data = PreparedData(tmp_path / "out")
    tok = data.tokenizer
    full = {}
    for name, rows in {**recs, "chat.jsonl": recs["chat.jsonl"] + trailing}.items():
        for i, r in enumerate(rows):
            if "prompt" in r:
                text = r["prompt"] + r["completion"]
            elif "instruction" in r:
                text = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") + "\n\n" + r["output"]
            else:
                text = tok.tok.apply_chat_template(r["messages"], tokenize=False)
            full[(f"user:qa/{name}", str(i))] = (text, r.get("messages", [{}])[-1].get("role", "assistant"))
    seen = {"cut": 0, "whole": 0, "trailing user turn": 0}
    for split in ("train", "val", "test"):
        raw, ds, ms = data.raw(split, "qa"), data.indexed("qa", split), data.indexed("qa", split, mask=True)
        for j, row in enumerate(raw):
            ids, mask = ds[j].tolist(), ms[j].tolist()
            text, last_role = full[(row["source"], row["doc_id"])]
            whole = tok.decode(ids[:-1]) == text
            kind = "cut" if not whole else "whole" if last_role == "assistant" else "trailing user turn"
            seen[kind] += 1
            assert ids[-1] == tok.eos_id and mask[-1] == (kind == "whole"), (kind, row["doc_id"], mask[-6:])
    assert min(seen.values()) > 0, seen
    # the plain-text domain's eos still counts (its documents have no mask files at all)
    assert "prose" not in data.masked
