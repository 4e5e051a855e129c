"""Instruction data (issue #16, items 1 and 6): the three record formats through the real build,
per-token loss masks stored beside the tokens and carried through packing and blending sample by
sample, the masked next-token mean, text-only batches unchanged, one-line errors for bad input."""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from instructfix import docstrings, hf_tokenizer, instruct_data, profile, records, user_folder  # noqa: F401
from desmoe.data import PreparedData
from desmoe.data.packing import DomainSampler
from tolerance import assert_close
from desmoe.errors import UserError


class Mem:
    """An in-memory stand-in with the indexed dataset's two reads (the sampler's only use of it)."""

    def __init__(self, docs):
        self.docs, self.sequence_lengths = docs, [len(d) for d in docs]

    def get(self, i, offset=0, length=None):
        return np.asarray(self.docs[i][offset:offset + length])


def _mem():
    rng = np.random.default_rng(7)
    return {d: Mem([rng.integers(0, 1000, int(rng.integers(3, 60))) for _ in range(30)]) for d in (0, 2, 5)}


def _digest(sampler):
    h = hashlib.sha256()
    for hom in (True, False):
        for step in range(4):
            for rank in range(2):
                b = sampler.batch(3, 40, 11, step, rank, 2, hom)
                for t in (b.input_ids, b.domain, b.token_domain):
                    h.update(t.numpy().tobytes())
    return h.hexdigest()


# the digest of these batches from the packer as it was before loss masks (commit 33f2961)
BEFORE_MASKS = "5e8c9453c60f0cd4a71e64fc391d45bf3bb1128998c481248e3d8e017e762923"


def test_text_only_batches_are_as_before_masks():
    ds = _mem()
    plain = DomainSampler(ds, {0: 1.0, 2: 2.0, 5: 0.5})
    assert _digest(plain) == BEFORE_MASKS
    assert plain.batch(3, 40, 11, 0, 0, 2, False).loss_mask.all()
    # a masked domain changes nothing but the mask: reading masks draws no random numbers
    masks = {2: Mem([np.arange(len(d)) % 2 for d in ds[2].docs])}
    assert _digest(DomainSampler(ds, {0: 1.0, 2: 2.0, 5: 0.5}, masks=masks)) == BEFORE_MASKS


def test_masked_mean_is_per_counted_token():
    from desmoe.objective import next_token_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.rand(3, 9) > 0.5
    nll = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 50), ids[:, 1:].reshape(-1),
                                            reduction="none")
    keep = mask[:, 1:].reshape(-1)
    assert torch.equal(next_token_loss(model, ids, mask), nll[keep].sum() / keep.sum())
    # all ones: the plain mean up to summation order (the recipes pass None for such batches), whose error
    # over the 3 x 8 positive terms depends on the CPU's vector width: the sum's bound, not a fitted rtol
    plain = next_token_loss(model, ids)
    assert_close(next_token_loss(model, ids, torch.ones_like(mask)), plain, terms=ids[:, 1:].numel())
    empty = next_token_loss(model, ids, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad  # a batch of prompts only: no gradient, still a graph


def _expected(data: PreparedData):
    """(source, doc_id) -> the record's (text, counts-in-the-loss) segments, from the user's files, by format."""
    from data_prep.user_data import _segments, record_format

    tok = data.tokenizer.tok
    chat = lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)  # noqa: E731
    recs, _ = records()
    return {(f"user:qa/{name}", str(i)): _segments(record_format(r), r, "w", chat, "")
            for name, rows in recs.items() for i, r in enumerate(rows)}


def test_formats_give_response_only_masks_document_by_document(instruct_data):
    from tokfix import oracle_mask

    data = PreparedData(instruct_data)
    tok, want = data.tokenizer, _expected(data)
    assert data.masked == ["qa"] and data.meta["loss_masks"] == ["qa"]
    assert data.meta["record_encoding"] == "whole-text"
    seen = set()
    for split in ("train", "val", "test"):
        raw, ds, ms = data.raw(split, "qa"), data.indexed("qa", split), data.indexed("qa", split, mask=True)
        assert len(raw) == len(ds) == len(ms) and ms[0].dtype == np.uint8
        for j, row in enumerate(raw):
            ids, mask = ds[j], ms[j]
            segs = want[(row["source"], row["doc_id"])]
            full = "".join(t for t, _ in segs)
            seen.add(row["source"])
            body, keep = ids[:-1].tolist(), mask[:-1].astype(int).tolist()
            # the eos is trained on after a whole response (not after one cut to the budget: tests/test_instruct_eos.py)
            assert len(ids) == len(mask) and ids[-1] == tok.eos_id and mask[-1] == (tok.decode(body) == full)
            # the whole text's encoding (the last train record may be cut to the budget), and a token counts iff
            # it covers a response character (pc.jsonl's prompts end in a space: " word" straddles and counts)
            whole = tok.encode([full])[0]
            assert body == whole[: len(body)] and keep == oracle_mask(tok, whole, segs)[: len(body)]
            assert len(body) == len(whole) or (split == "train" and j == len(raw) - 1)
            assert row["text"] == (full if len(body) == len(whole) else tok.decode(body))
            assert not keep[0] and any(keep)  # every format starts with prompt tokens
    assert seen == {"user:qa/pc.jsonl", "user:qa/alpaca.jsonl", "user:qa/chat.jsonl"}
    assert not (instruct_data / "indexed" / "prose" / "train.mask.idx").exists()  # plain text: no mask files


class Spy:
    """Wraps an indexed dataset and records the (document, offset, length) reads of the packer."""

    def __init__(self, ds, log, domain):
        self.ds, self.log, self.domain, self.sequence_lengths = ds, log, domain, ds.sequence_lengths

    def get(self, i, offset=0, length=None):
        self.log.append((self.domain, i, offset, length))
        return self.ds.get(i, offset, length)


def test_packed_and_blended_mask_is_the_documents_masks_end_to_end(instruct_data):
    data = PreparedData(instruct_data)
    ids = {d: data.indexed(name, "train") for d, name in enumerate(data.domains)}
    masks = {0: data.indexed("qa", "train", mask=True)}
    for homogeneous in (True, False):
        log = []
        spied = {d: Spy(ds, log, d) for d, ds in ids.items()}
        batch = DomainSampler(spied, None, "train", masks=masks).batch(4, 48, 3, 1, 0, 2, homogeneous)
        via = next(data.batches("train", 4, 48, seed=3, rank=0, world=2, step=1, homogeneous=homogeneous))
        assert torch.equal(batch.loss_mask, via.loss_mask) and torch.equal(batch.input_ids, via.input_ids)
        # the reads, laid end to end row by row, give the batch's tokens, domains and masks exactly
        flat = lambda parts: np.concatenate(parts).reshape(4, 49)  # noqa: E731
        assert np.array_equal(flat([ids[d].get(i, o, n) for d, i, o, n in log]), batch.input_ids.numpy())
        assert np.array_equal(flat([np.full(n, d) for d, i, o, n in log]), batch.token_domain.numpy())
        want = flat([masks[0].get(i, o, n).astype(bool) if d == 0 else np.ones(n, bool) for d, i, o, n in log])
        assert np.array_equal(want, batch.loss_mask.numpy())
        assert batch.loss_mask.dtype == torch.bool and not batch.loss_mask.all()
    assert set(batch.token_domain.unique().tolist()) == {0, 1}  # the blended batch mixed both


def _fails(profile_path, out, *overrides):
    from data_prep.build import build

    with pytest.raises(UserError) as err:
        build(str(profile_path), out, cache=out.parent / "cache", overrides=list(overrides), quiet=True)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_instruction_input_is_one_line(tmp_path):
    folder = user_folder(tmp_path)
    texts = [a for _, a in docstrings()]
    prof = profile(tmp_path, folder, hf_tokenizer(tmp_path / "hf", texts))
    out = tmp_path / "out"
    qa = folder / "qa"
    (qa / "pc.jsonl").write_text((qa / "pc.jsonl").read_text() + json.dumps({"messages": []}) + "\n")
    n = len((qa / "pc.jsonl").read_text().splitlines())
    assert f"pc.jsonl: line {n}: a 'messages' record in a file of 'prompt/completion' records" in _fails(prof, out)
    (qa / "pc.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    msg = _fails(prof, out)
    assert "pc.jsonl: line 1: expected an object with a string field 'text', 'messages', 'prompt'+'completion' or " \
           "'instruction'+'output' (unknown record format; keys: question, answer)" in msg
    (qa / "pc.jsonl").write_text(json.dumps({"prompt": "q", "completion": ""}) + "\n")
    assert "pc.jsonl: line 1: key 'completion': expected a non-empty string" in _fails(prof, out)
    (qa / "pc.jsonl").unlink()
    # messages: a sentencepiece build, and an HF tokenizer without a chat template, are refused
    assert "chat.jsonl: line 1: 'messages' needs a chat template: tokenizer.kind is 'sentencepiece'" in \
        _fails(prof, out, "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=400")
    bare = hf_tokenizer(tmp_path / "bare", texts, chat=False)
    assert f"chat.jsonl: line 1: 'messages' needs a chat template: the HF tokenizer '{bare}' " \
           f"(tokenizer.hf_path) has no chat_template" in _fails(prof, out, f"tokenizer.hf_path={bare}")
    # a prompt longer than max_record_tokens leaves no response
    msg = _fails(prof, out, "max_record_tokens=8")
    assert re.search(r"mine/qa/(alpaca|chat)\.jsonl: line \d+: the response is empty after truncation to "
                     r"max_record_tokens=8 \(prompt \d+ tokens\)", msg), msg
    assert not out.exists()


def test_a_folder_of_piece_by_piece_records_is_refused_and_fingerprints_follow_the_data(instruct_data, tmp_path):
    """A folder with loss masks built before record_encoding (its records tokenized piece by piece) is refused,
    not trained on; a finished run is reused only while the folder's fingerprint (in launcher/desmoe_study.py's
    inputs.sha256) is unchanged: a rebuild that only re-times keeps it, changed tokens or masks do not."""
    import shutil

    from desmoe import integrity
    from desmoe.data.prepared import fingerprint

    old = tmp_path / "old"
    shutil.copytree(instruct_data, old)
    assert fingerprint(old) == fingerprint(instruct_data)
    (old / "timing.json").write_text('{"seconds": 1}\n')  # the one file identical builds differ in
    integrity.seal(old)
    assert fingerprint(old) == fingerprint(instruct_data)
    meta = json.loads((old / "meta.json").read_text())
    del meta["record_encoding"]
    (old / "meta.json").write_text(json.dumps(meta))
    integrity.seal(old)
    with pytest.raises(UserError, match=r"^\S+meta.json: key 'record_encoding': None, expected 'whole-text' "
                                        r"\(instruction records tokenized piece by piece\); rebuild it with "
                                        r"python -m data_prep\.build --(profile|out) "):  # a command to run
        PreparedData(old)
    assert fingerprint(old) != fingerprint(instruct_data)
    shutil.copy(instruct_data / "meta.json", old / "meta.json")
    mask = old / "indexed" / "qa" / "train.mask.bin"
    body = bytearray(mask.read_bytes())
    body[0] ^= 1
    mask.write_bytes(bytes(body))
    integrity.seal(old)
    assert PreparedData(old).masked == ["qa"] and fingerprint(old) != fingerprint(instruct_data)


def test_chat_keys_the_template_would_not_see_are_refused(tmp_path):
    """An assistant turn's tool_calls, a tool message's name and a record's tools were dropped before rendering,
    so the model trained on another text than the chat template gives (a tool's answer with no call before it).
    Null keys are absent: HF datasets' to_json writes every key of the column into every message."""
    from datasets import Dataset
    from jinja2 import Template

    from data_prep.user_data import user_docs

    tmpl = Template("{% for m in messages %}<|{{ m.role }}|>{% if m.tool_calls %}CALL {{ m.tool_calls[0].name }}"
                    "{% endif %}{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = lambda msgs, gen: tmpl.render(messages=msgs, add_generation_prompt=gen)  # noqa: E731
    plain = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}
    tool = {"messages": [{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "", "tool_calls": [{"name": "weather"}]},
                         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    (tmp_path / "qa").mkdir()
    f = tmp_path / "qa" / "chat.jsonl"
    Dataset.from_list([plain, plain]).to_json(f)
    assert [d.text for d in user_docs(tmp_path, ["qa"], "h", chat)["qa"]] == [chat(plain["messages"], False)] * 2
    Dataset.from_list([plain, tool]).to_json(f)  # every message now has a tool_calls key, null but in one
    with pytest.raises(UserError, match=r"qa/chat\.jsonl: line 2: key 'messages\[1\]\.tool_calls': not rendered"):
        user_docs(tmp_path, ["qa"], "h", chat)
    f.write_text(json.dumps({**plain, "tools": [{"name": "weather"}]}) + "\n")
    with pytest.raises(UserError, match=r"qa/chat\.jsonl: line 1: key 'tools': not rendered"):
        user_docs(tmp_path, ["qa"], "h", chat)


def test_user_data_in_a_records_only_instruct_domain_is_refused(tmp_path):
    """instruct.domains.<d>=records trains on the records generated from the sources only: a user's files for that
    domain (the demo's math/code/law/medicine/finance) were read, then dropped without a word."""
    from data_prep.build import build

    folder = tmp_path / "mine"
    for d in ("qa", "prose", "heldout"):
        (folder / d).mkdir(parents=True)
    (folder / "qa" / "pc.jsonl").write_text("".join(json.dumps({"prompt": f"What is {q}?\n", "completion": a}) + "\n"
                                                    for q, a in docstrings()[:15]))
    # plain "Question: ...\nAnswer: ..." text the build makes its own records of (without the check, the build
    # succeeds and trains on those alone); prose and held-out text
    (folder / "qa" / "qa.jsonl").write_text("".join(json.dumps({"text": f"Question: What is {q}?\nAnswer: {q}"}) + "\n"
                                                    for q, _ in docstrings()[15:45]))
    (folder / "prose" / "p.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for _, a in docstrings()[45:70]))
    (folder / "heldout" / "h.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for _, a in docstrings()[70:]))
    prof = profile(tmp_path, folder, tmp_path / "unused", tokenizer={"vocab_size": 400},
                   instruct={"domains": {"qa": "records"}, "max_records": 40, "exact_per_domain": 5})
    with pytest.raises(UserError, match=r"mine/qa: 45 user documents for domain 'qa', which instruct\.domains\.qa="
                                        r"'records' trains on the records generated from its sources only; set "
                                        r"instruct\.domains\.qa=mixed .* or leave 'qa' out of instruct\.domains$"):
        build(str(prof), tmp_path / "out", cache=tmp_path / "cache", quiet=True)
    assert not (tmp_path / "out").exists()


def test_instruction_records_in_the_held_out_set_are_refused(tmp_path):
    """The held-out set is scored by perplexity over every token and has no loss mask: chats put there were built
    without a word, their prompts and template markup measured, each cut at max_record_tokens mid-text."""
    from data_prep.build import build

    folder = user_folder(tmp_path)
    recs, prose = records()
    (folder / "qa" / "chat.jsonl").rename(folder / "heldout" / "chat.jsonl")
    tok = hf_tokenizer(tmp_path / "hf", [json.dumps(r) for rows in recs.values() for r in rows] + prose)
    with pytest.raises(UserError, match=r"mine/heldout/chat\.jsonl: line 1: an instruction record in the held-out set "
                                        r"'heldout' \(perplexity over every token, no loss mask\); expected plain text"):
        build(str(profile(tmp_path, folder, tok)), tmp_path / "out", cache=tmp_path / "cache", quiet=True)
