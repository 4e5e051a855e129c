"""Users' own data folders as people really bring them: gzip'd JSONL, stray files beside the data, hidden
entries, JSON written with ensure_ascii=False and CRLF, duplicate keys, lone surrogate escapes, strict chat
templates, chats that start with the assistant or hold an empty assistant turn (data_prep/user_data.py)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from instructfix import TEMPLATE, docstrings, hf_tokenizer, profile, user_folder
from data_prep.user_data import Record, encode_record, user_docs
from desmoe.errors import UserError

# Llama-2/Mistral-style: system turn allowed first, then user/assistant strictly alternating
STRICT = ("{% for m in messages %}{% if m['role'] != 'system' and ((m['role'] == 'user') != "
          "((loop.index0 - (1 if messages[0]['role'] == 'system' else 0)) % 2 == 0)) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _texts(root: Path, domain: str = "alpha", chat=None) -> list[str]:
    return sorted(d.text for d in user_docs(root, ["alpha", "beta"], "heldout", chat)[domain])


def _refused(root: Path, chat=None) -> str:
    with pytest.raises(UserError) as err:
        user_docs(root, ["alpha", "beta"], "heldout", chat, "no template")
    assert "\n" not in str(err.value)
    return str(err.value)


def test_gzipped_jsonl_is_read_and_other_files_are_refused_not_skipped(tmp_path):
    (tmp_path / "alpha" / "deep").mkdir(parents=True)
    (tmp_path / "alpha" / "a.jsonl").write_text(_jsonl([{"text": "plain one"}]))
    (tmp_path / "alpha" / "deep" / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl([{"text": "zipped"}]).encode()))
    # hidden entries are no data: a git checkout, macOS's .DS_Store, Jupyter's checkpoints
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "alpha" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "alpha" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "alpha" / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text(_jsonl([{"text": "stale"}]))
    assert _texts(tmp_path) == ["plain one", "zipped"]
    # a file the reader does not take was skipped without a word: now it is named
    for name in ("rows.json", "more.JSONL", "c.csv", "d.txt.gz"):
        (tmp_path / "alpha" / name).write_text("[]")
        assert _refused(tmp_path) == (f"{tmp_path / 'alpha' / name}: not a user data file (expected *.jsonl, "
                                      f"*.jsonl.gz, *.parquet, *.txt)")
        (tmp_path / "alpha" / name).unlink()
    # a file beside the domain folders (its domain is unknown)
    (tmp_path / "alpha.jsonl").write_text(_jsonl([{"text": "lost"}]))
    assert _refused(tmp_path) == (f"{tmp_path / 'alpha.jsonl'}: a file directly in user_data; put it in a domain "
                                  f"folder ({tmp_path}/<domain>/alpha.jsonl; domains: alpha, beta)")
    (tmp_path / "alpha.jsonl").unlink()
    (tmp_path / "alpha" / "deep" / "b.jsonl.gz").write_bytes(b"\x1f\x8b\x08 cut short")
    assert _refused(tmp_path).startswith(f"{tmp_path / 'alpha' / 'deep' / 'b.jsonl.gz'}: unreadable user file (")


def test_line_separators_inside_strings_and_crlf_are_read(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 unescaped in a string (json.dumps(..., ensure_ascii=False) writes
    them so); str.splitlines() cut the line there and the file was refused as invalid JSON."""
    (tmp_path / "alpha").mkdir()
    rows = [{"text": f"before{c}after"} for c in ("\u2028", "\u2029", "\u0085")] + [{"text": "last"}]
    (tmp_path / "alpha" / "a.jsonl").write_bytes(_jsonl(rows).replace("\n", "\r\n").encode())
    assert _texts(tmp_path) == sorted(r["text"] for r in rows)


def test_duplicate_keys_are_refused(tmp_path):
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "a.jsonl").write_text('{"prompt": "Q: 1+1?\\nA:", "completion": " 2"}\n'
                                                '{"prompt": "Q: 2+2?\\nA:", "completion": " 5", "completion": " 4"}\n')
    assert _refused(tmp_path) == f"{tmp_path / 'alpha' / 'a.jsonl'}: line 2: key 'completion' appears twice in one object"


def test_a_lone_surrogate_is_one_line_not_a_traceback(tmp_path):
    from data_prep.build import build

    texts = [a for _, a in docstrings()]
    folder = user_folder(tmp_path)
    prof = profile(tmp_path, folder, hf_tokenizer(tmp_path / "hf", texts))
    # an emoji cut in half by a scraper: its high surrogate's escape without the low one
    cut = '{"text": "a tweet \\ud83d cut in half by the scraper that collected it"}\n'
    (folder / "prose" / "cut.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n" + cut)
    with pytest.raises(UserError) as err:
        build(str(prof), tmp_path / "out", cache=tmp_path / "cache", quiet=True)
    assert str(err.value) == (f"{folder / 'prose' / 'cut.jsonl'}: line 2: a lone UTF-16 surrogate '\\ud83d' at "
                              f"character 8 (not valid Unicode text; a \\ud800-\\udfff escape without its pair)")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from desmoe.data.tokenizer import HFTokenizer

    tmp = tmp_path_factory.mktemp("chat")
    path = hf_tokenizer(tmp / "tok", [a for _, a in docstrings()] + [TEMPLATE])
    tok = HFTokenizer(path)
    strict = HFTokenizer(path).tok
    strict.chat_template = STRICT
    render = lambda t: lambda msgs, gen: t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    return tok, render(tok.tok), render(strict)


def test_a_template_refusing_the_chat_names_the_line(tmp_path, tokenizers):
    _, _, strict = tokenizers
    (tmp_path / "alpha").mkdir()
    ok = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                       {"role": "assistant", "content": "Hello."}]}
    bad = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "user", "content": "Anyone?"},
                        {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "alpha" / "c.jsonl").write_text(_jsonl([ok, bad]))
    assert _refused(tmp_path, strict) == (
        f"{tmp_path / 'alpha' / 'c.jsonl'}: line 2: key 'messages': the chat template cannot render messages[:2] "
        f"(TemplateError: Conversation roles must alternate user/assistant/user/assistant/...)")
    first = {"messages": [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "Hi."}]}
    (tmp_path / "alpha" / "c.jsonl").write_text(_jsonl([first]))
    assert _refused(tmp_path, strict).startswith(f"{tmp_path / 'alpha' / 'c.jsonl'}: line 1: key 'messages': the chat "
                                                 f"template cannot render messages[:0] (ValueError: ")


def test_an_empty_assistant_turn_is_context_not_response(tmp_path, tokenizers):
    tok, chat, _ = tokenizers
    (tmp_path / "alpha").mkdir()
    msgs = [{"role": "system", "content": "You document Python."}, {"role": "user", "content": "Hello?"},
            {"role": "assistant", "content": ""}, {"role": "user", "content": "What is json.dumps?"},
            {"role": "assistant", "content": "It serialises an object to a JSON string."}]
    (tmp_path / "alpha" / "c.jsonl").write_text(_jsonl([{"messages": msgs}]))
    rec, = user_docs(tmp_path, ["alpha"], "heldout", chat)["alpha"]
    assert isinstance(rec, Record) and rec.text == chat(msgs, False)
    ids = encode_record(tok, rec, 4096)
    trained = tok.decode([t for t, m in zip(ids, rec.mask) if m])
    # only the answer that says something (and its end-of-turn markup) is trained on
    assert trained == "It serialises an object to a JSON string.<|end|>\n"


def test_chats_sharing_a_long_system_prompt_are_not_near_duplicates(tmp_path):
    """Whole-text MinHash saw 40 chats behind one 400-word system prompt (a tool specification, a persona)
    as near duplicates and kept 1 or 2 of them, silently.  Now a record is a near duplicate of a record
    only if its response is one too; a true near copy (one word of the question changed, same answer)
    is still dropped."""
    from data_prep.build import build
    from desmoe.data import PreparedData

    docs = docstrings()
    system = " ".join(a for _, a in docs[-12:])
    assert len(system.split()) > 300
    chat = lambda q, a: {"messages": [{"role": "system", "content": system},  # noqa: E731
                                      {"role": "user", "content": f"What does {q} do?"},
                                      {"role": "assistant", "content": a}]}
    rows = [chat(q, a) for q, a in docs[:40]]
    copies = [chat(q + "()", a) for q, a in docs[:2]]  # the same question and answer, one token apart
    folder = user_folder(tmp_path)
    for f in (folder / "qa").iterdir():
        f.unlink()
    (folder / "qa" / "chat.jsonl").write_text(_jsonl(rows + copies))
    texts = [a for _, a in docs] + [system]
    prof = profile(tmp_path, folder, hf_tokenizer(tmp_path / "hf", texts), budget_tokens=10 ** 6, equalize=False,
                   max_record_tokens=4096)
    meta = build(str(prof), tmp_path / "out", cache=tmp_path / "cache", quiet=True)
    data = PreparedData(tmp_path / "out")
    kept = sorted(r["doc_id"] for s in ("train", "val", "test") for r in data.raw(s, "qa"))
    # of each near copy and its original, the one first in the build's seeded order stays
    assert len(kept) == 40 and {str(i) for i in range(2, 40)} <= set(kept), kept
    assert all((str(i) in kept) != (str(40 + i) in kept) for i in range(2)), kept
    assert meta["dropped"]["near"] == 2


def test_license_in_us_spelling_is_the_licence(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "a.jsonl").write_text(_jsonl([{"text": "one", "license": "CC-BY-4.0"},
                                                        {"text": "two", "licence": "MIT"}, {"text": "three"}]))
    pq.write_table(pa.table({"text": ["four"], "license": ["Apache-2.0"]}), tmp_path / "alpha" / "b.parquet")
    docs = user_docs(tmp_path, ["alpha"], "heldout")["alpha"]
    assert {d.text: d.licence for d in docs} == {"one": "CC-BY-4.0", "two": "MIT", "three": "user-supplied",
                                                 "four": "Apache-2.0"}
