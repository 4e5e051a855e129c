"""The multi-domain data pipeline on the real tiny profile (pinned registry packages)."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep.clean import NearDupIndex, dedupe, minhash
from datafix import CACHE
from desmoe.data import PreparedData
from desmoe.errors import UserError

SPLITS = ("train", "val", "test")


def _files(root: Path) -> dict[str, bytes]:
    # timing.json holds wall times; the manifest lists timing.json's hash too (compared below without it)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("timing.json", "desmoe-manifest.json")}


def _manifest_without_timing(root: Path) -> dict:
    files = json.loads((root / "desmoe-manifest.json").read_text())["files"]
    return {k: v for k, v in files.items() if k != "timing.json"}


def test_same_seed_gives_byte_identical_outputs(tiny_data, tmp_path):
    from data_prep.build import build

    # the rebuild tokenizes with a process pool (the first build: one process): same bytes
    build("tiny", tmp_path / "again", cache=CACHE, quiet=True, overrides=["workers=2"])
    first, again = _files(tiny_data), _files(tmp_path / "again")
    assert sorted(first) == sorted(again)
    assert [k for k in first if first[k] != again[k]] == []
    assert _manifest_without_timing(tiny_data) == _manifest_without_timing(tmp_path / "again")
    assert any(k.endswith(".bin") for k in first) and "tokenizer/spm.model" in first
    assert json.loads((tmp_path / "again" / "timing.json").read_text())["workers"] == 2


def test_splits_disjoint_by_document_no_near_duplicates_across_splits_no_heldout_leak(tiny_data):
    data = PreparedData(tiny_data)
    threshold = data.meta["config"]["near_dup_threshold"]
    index, owner = NearDupIndex(threshold), []
    for name in [*data.domains, data.heldout_name]:
        parents = {}
        for split in SPLITS if name != data.heldout_name else ("test",):
            table = pq.read_table(tiny_data / "raw" / name / f"{split}.parquet").to_pylist()
            assert table, (name, split)
            for row in table:
                assert row["domain"] == name and row["licence"] and row["source"]
                parent = row["doc_id"].split("@")[0]  # chunks of one document share its split
                assert parents.setdefault((row["source"], parent), split) == split, (name, row["doc_id"])
                sig = minhash(row["text"])
                hit = index.query(sig)
                assert hit is None or owner[hit] == (name, split), \
                    f"near duplicate across splits: {owner[hit]} vs {(name, split)}: {row['text'][:80]!r}"
                index.add(sig)
                owner.append((name, split))
    # every domain got the same train budget, and the held-out set is never trained on
    tokens = {d: data.meta["counts"][d]["train"]["tokens"] for d in data.domains}
    assert len(set(tokens.values())) == 1 and min(tokens.values()) == data.meta["budget_tokens_per_domain"]
    assert data.domains == ["math", "code", "law", "medicine", "finance", "general"]
    assert not (tiny_data / "indexed" / data.heldout_name / "train.idx").exists()


def test_near_duplicate_detector_on_real_text(tiny_data):
    text = pq.read_table(tiny_data / "raw" / "code" / "train.parquet").column("text")[0].as_py()
    words = text.split()
    edited = " ".join(words[:10] + ["inserted"] + words[10:-3])   # a few words changed
    other = pq.read_table(tiny_data / "raw" / "law" / "train.parquet").column("text")[0].as_py()
    keep, stats = dedupe([text, edited, text.upper(), other], threshold=0.8)
    assert keep == [True, False, False, True] and stats == {"exact": 1, "near": 1, "heldout": 0}
    keep, stats = dedupe([edited, other], threshold=0.8, protected=[text])
    assert keep == [False, True] and stats["heldout"] == 1


def test_indexed_dataset_round_trip_equals_tokenizer_output(tiny_data):
    data = PreparedData(tiny_data)
    tok = data.tokenizer
    eos = tok.eos_id
    for name in [*data.domains, data.heldout_name]:
        for split in SPLITS if name != data.heldout_name else ("test",):
            ds = data.indexed(name, split)
            texts = data.raw(split, name)["text"]
            assert len(ds) == len(texts) > 0
            encoded = tok.encode(texts)
            for i, (ids, text) in enumerate(zip(encoded, texts)):
                got = ds[i].tolist()
                assert got[-1] == eos
                if split == "train" and i == len(texts) - 1:   # the budget may cut the last document
                    assert tok.decode(got[:-1]) == text
                else:
                    assert got[:-1] == ids, (name, split, i)
                    assert tok.decode(ids) == text  # lossless: byte fallback, identity normalisation


def _streams(data, split):
    """Per domain: all its documents' tokens laid end to end, as bytes for substring search."""
    out = {}
    for d in data.domains:
        ds = data.indexed(d, split)
        out[data.domain_id(d)] = [np.asarray(ds[i], dtype=np.int32).tobytes() for i in range(len(ds))]
    return out


def _runs(ids, owners):
    start = 0
    for j in range(1, len(owners) + 1):
        if j == len(owners) or owners[j] != owners[start]:
            yield int(owners[start]), ids[start:j]
            start = j


@pytest.mark.parametrize("homogeneous", [True, False])
def test_domain_ids_survive_packing_and_blending_sample_by_sample(tiny_data, homogeneous):
    data = PreparedData(tiny_data)
    streams = _streams(data, "train")
    eos = data.tokenizer.eos_id
    batches = data.batches("train", micro_batch=4, seq_len=96, seed=3, rank=1, world=2, homogeneous=homogeneous)
    seen_mixed = False
    for _, batch in zip(range(12), batches):
        assert batch.input_ids.shape == batch.token_domain.shape == (4, 97) and batch.domain.shape == (4,)
        assert batch.inputs.shape == batch.labels.shape == (4, 96)
        if homogeneous:
            assert (batch.domain == batch.domain[0]).all() and (batch.token_domain == batch.domain[0]).all()
        for b in range(4):
            ids, owners = batch.input_ids[b].numpy(), batch.token_domain[b].numpy()
            counts = np.bincount(owners, minlength=len(data.domains))
            assert batch.domain[b] == counts.argmax()
            seen_mixed |= len(set(owners.tolist())) > 1
            # every run of tokens labelled d is a piece of documents of domain d: split at eos
            # (document ends) and find each piece inside one document of that domain
            for d, run in _runs(ids, owners):
                pieces = np.split(run, np.nonzero(run == eos)[0] + 1)
                for piece in pieces:
                    if len(piece) == 0:
                        continue
                    needle = piece.astype(np.int32).tobytes()
                    assert any(needle in doc for doc in streams[d]), f"tokens labelled {d} not from domain {d}"
    assert seen_mixed == (not homogeneous)


def test_batches_are_a_pure_function_of_seed_step_rank(tiny_data):
    data = PreparedData(tiny_data)
    run = data.batches("train", micro_batch=2, seq_len=32, seed=5, rank=0, world=2)
    first = [next(run) for _ in range(6)]
    resumed = next(data.batches("train", micro_batch=2, seq_len=32, seed=5, rank=0, world=2, step=4))
    assert resumed.step == 4 and (resumed.input_ids == first[4].input_ids).all()
    other_rank = next(data.batches("train", micro_batch=2, seq_len=32, seed=5, rank=1, world=2, step=4))
    assert not (other_rank.input_ids == first[4].input_ids).all()
    only = data.batches("val", micro_batch=2, seq_len=32, seed=5, rank=0, world=1, domains=["law", "finance"])
    ids = {int(next(only).domain[0]) for _ in range(20)}
    assert ids == {data.domain_id("law"), data.domain_id("finance")}
    with pytest.raises(UserError, match="unknown domain 'poetry'"):
        data.batches("train", 2, 32, seed=0, rank=0, world=1, domains=["poetry"])


def test_eval_sets_have_exact_answers_from_unseen_documents(tiny_data):
    data = PreparedData(tiny_data)
    ev = data.eval_sets()
    assert len(ev.math) >= 40 and all(m.question and m.answer for m in ev.math)
    assert "mathematics_dataset" in ev.notes["math"]
    train_text = "\n".join(t for d in data.domains for t in data.raw("train", d)["text"])
    assert not any(f"Question: {m.question}" in train_text for m in ev.math)
    for domain in ("code", "law", "medicine", "finance"):
        items = ev.mcq[domain]
        assert len(items) >= 5, domain
        seen = {(r["source"], r["doc_id"].split("@")[0]) for s in ("train", "val")
                for r in data.raw(s, domain).select_columns(["source", "doc_id"]).to_list()}
        for it in items:
            assert len(it.choices) == 4 == len(set(it.choices)) and 0 <= it.answer < 4
            assert it.doc_id and (it.source, it.doc_id) not in seen  # from documents never trained on
    assert set(ev.heldout_text) == set(data.domains) and all(ev.heldout_text.values())
    assert ev.heldout_general and not any(t[:200] in train_text for t in ev.heldout_general)
    card = data.card.read_text()
    for d in data.domains:
        assert f"| {d} |" in card
    assert "GPL-3+" in card and "| math Q/A |" in card


def test_tokenizer_mismatch_with_indexed_data_is_one_line(tiny_data, tmp_path):
    import shutil

    from desmoe.data.tokenizer import SentencePieceTokenizer

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    other = next(CACHE.glob("unpacked/pip/sentencepiece-0.2.3/*/test/botchan_en_unigram_1000.model"))
    shutil.copy(other, copy / "tokenizer" / "spm.model")
    with pytest.raises(UserError, match=r"spm\.model: prepared data folder file is (truncated|longer than written)"):
        PreparedData(copy)  # the folder's manifest notices the swap first
    (copy / "desmoe-manifest.json").unlink()  # a folder without a manifest: the tokenizer check itself
    with pytest.raises(UserError, match=r"tokenizer .*spm.model \(vocab 1000, .*\) does not match the indexed "
                                        r"data in .* \(built with vocab 2000"):
        PreparedData(copy).tokenizer
    with pytest.raises(UserError, match="does not match"):
        PreparedData(tiny_data).check_tokenizer(SentencePieceTokenizer(other))
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == PreparedData(tiny_data).tokenizer.vocab_size == 2000


def test_mathematics_dataset_generator_is_seeded_across_processes(tmp_path):
    from data_prep.mathgen import run_worker

    package = next(CACHE.glob("unpacked/pip/mathematics-dataset-1.0.1"))
    six = next(CACHE.glob("unpacked/pip/six-1.17.0"))
    # every module, 5 problems each: the composed modules' statement order and the prime modules' sympy
    # draws once differed between processes (30 of 280 rows), which one module at 2 problems did not show
    procs = [run_worker(package, six, "train", 5, 1234, tmp_path / f"{i}.jsonl") for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], procs[0].stderr.read()
    first, second = (tmp_path / "0.jsonl").read_text(), (tmp_path / "1.jsonl").read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    assert len(rows) >= 250 and any("composed" in r["module"] for r in rows)
    assert any(r["module"].startswith("numbers__is_prime") for r in rows)
    differ = [(a, b) for a, b in zip(first.splitlines(), second.splitlines()) if a != b]
    assert not differ, f"{len(differ)} of {len(rows)} rows differ between two processes, first: {differ[0]}"
    # a module's problems do not depend on which other modules run
    only = run_worker(package, six, "train", 5, 1234, tmp_path / "only.jsonl", only="algebra")
    assert only.wait(timeout=300) == 0
    assert (tmp_path / "only.jsonl").read_text().splitlines() == [
        json.dumps(r, ensure_ascii=False) for r in rows if r["module"].startswith("algebra")]
