"""Chat records whose turns the tokenizer's chat template does not render (data_prep/user_data.py)."""
from __future__ import annotations

import json

import pytest

from instructfix import TEMPLATE, docstrings, hf_tokenizer
from data_prep.user_data import Record, encode_record, user_docs
from desmoe.errors import UserError

# the common template shape: system/user/assistant branches, any other role rendered as nothing
KNOWN_ROLES = ("{% for m in messages %}{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}<|end|>\n"
               "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
               "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}<|end|>\n{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = [{"role": "system", "content": "You answer from the tool's output."},
        {"role": "user", "content": "Which function serialises an object to JSON?"},
        {"role": "tool", "content": "json.dumps(obj) -> str"},
        {"role": "assistant", "content": "json.dumps returns the JSON text of the object."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from desmoe.data.tokenizer import HFTokenizer

    path = hf_tokenizer(tmp_path_factory.mktemp("roles") / "tok", [a for _, a in docstrings()] + [TEMPLATE])
    return HFTokenizer(path)


def _chat(tok, template):
    return lambda msgs, gen: tok.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                                         chat_template=template)


def test_a_turn_the_template_does_not_render_is_refused(tmp_path, tok):
    (tmp_path / "alpha").mkdir()
    ok = {"messages": [CHAT[0], CHAT[1], CHAT[3]]}
    (tmp_path / "alpha" / "c.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(UserError) as err:
        user_docs(tmp_path, ["alpha"], "heldout", _chat(tok, KNOWN_ROLES))
    # before: the tool turn vanished and the answer was trained after a question alone
    assert str(err.value) == (f"{tmp_path / 'alpha' / 'c.jsonl'}: line 2: key 'messages[2].content': the chat "
                              f"template does not render this 'tool' turn's text; expected a role the template renders")


def test_a_template_that_renders_every_role_keeps_the_tool_turn_as_context(tmp_path, tok):
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "c.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    chat = _chat(tok, TEMPLATE)
    rec, = user_docs(tmp_path, ["alpha"], "heldout", chat)["alpha"]
    assert isinstance(rec, Record) and rec.text == chat(CHAT, False) and "<|tool|>\njson.dumps(obj)" in rec.text
    ids = encode_record(tok, rec, 4096)
    trained = tok.decode([t for t, m in zip(ids, rec.mask) if m])
    assert trained == CHAT[3]["content"] + "<|end|>\n"
