"""Users' text holding the text of one of the HF tokenizer's special tokens (data_prep/user_data.py)."""
from __future__ import annotations

import json

import pytest

from instructfix import TEMPLATE, docstrings, hf_tokenizer
from desmoe.errors import UserError


def _profile(tmp, folder, tok):
    cfg = {"profile": "sp", "seed": 5, "domains": {"prose": []}, "heldout": "heldout", "budget_tokens": 3000,
           "val_fraction": 0.2, "test_fraction": 0.2, "workers": 1, "min_chars": 20, "user_data": str(folder),
           "mathgen": {"enabled": False}, "tokenizer": {"kind": "hf", "hf_path": str(tok)}}
    (tmp / "p.yaml").write_text(json.dumps(cfg))
    return str(tmp / "p.yaml")


def test_an_eos_written_in_a_text_is_refused_not_encoded_as_eos(tmp_path):
    from data_prep.build import build

    texts = [a for _, a in docstrings()]
    folder = tmp_path / "mine"
    for d in ("prose", "heldout"):
        (folder / d).mkdir(parents=True)
    # a scraped text that kept a generator's end marker: "</s>" is this tokenizer's eos
    rows = [{"text": t} for t in texts[:50]]
    rows[7]["text"] = rows[7]["text"] + "</s>More text after the marker, as scraped."
    (folder / "prose" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "heldout" / "h.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[50:]))
    tok = hf_tokenizer(tmp_path / "tok", texts)
    with pytest.raises(UserError) as err:  # before: built, the eos id inside the document
        build(_profile(tmp_path, folder, tok), tmp_path / "out", cache=tmp_path / "cache", quiet=True)
    at = len(texts[7])
    assert str(err.value) == (f"{folder / 'prose' / 't.jsonl'}: line 8: key 'text' holds '</s>' at character {at}, "
                              f"the text of a special token of the tokenizer (tokenizer.hf_path): it would be encoded "
                              f"as that token, not as text; expected text without it")
    assert not (tmp_path / "out").exists()


def test_chat_markup_in_a_message_is_refused_but_the_template_s_own_is_not(tmp_path):
    from types import SimpleNamespace

    from data_prep.user_data import chat_renderer, special_texts, user_docs

    tok = hf_tokenizer(tmp_path / "tok", [a for _, a in docstrings()] + [TEMPLATE])
    spec = SimpleNamespace(kind="hf", hf_path=str(tok))
    assert "</s>" in special_texts(spec) and special_texts(SimpleNamespace(kind="sentencepiece")) == ()
    (tmp_path / "u" / "alpha").mkdir(parents=True)
    ok = [{"role": "user", "content": "What does json.dumps return?"}, {"role": "assistant", "content": "A str."}]
    bad = [ok[0], {"role": "assistant", "content": "A str.</s><s>Anything else?"}]
    (tmp_path / "u" / "alpha" / "c.jsonl").write_text(json.dumps({"messages": ok}) + "\n")
    rec, = user_docs(tmp_path / "u", ["alpha"], "heldout", *chat_renderer(spec), specials=special_texts(spec))["alpha"]
    assert rec.text.endswith("A str.<|end|>\n")
    (tmp_path / "u" / "alpha" / "c.jsonl").write_text(json.dumps({"messages": bad}) + "\n")
    with pytest.raises(UserError) as err:
        user_docs(tmp_path / "u", ["alpha"], "heldout", *chat_renderer(spec), specials=special_texts(spec))
    assert str(err.value).startswith(f"{tmp_path / 'u' / 'alpha' / 'c.jsonl'}: line 1: key 'messages[1].content' holds "
                                     f"'</s>' at character 6, the text of a special token")
