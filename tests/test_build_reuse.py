"""``python -m data_prep.build --reuse`` keeps --out only while its stamp (data_prep/stamp.py) is the one this build
would write.  Before, `make demo` reused any data/demo whose meta.json mentioned "record_encoding": a folder of
older data_prep code, another profile or other overrides was read silently after a `git pull`.  No download:
data_prep's build is replaced by a writer of a tiny folder (as tests/test_realbase_data.py does)."""
import json
import os
import sys
from pathlib import Path

import pytest

import data_prep.build
import data_prep.stamp
from data_prep.stamp import BUILD_STAMP, build_reused, build_stamp
from desmoe import integrity


@pytest.fixture
def builds(monkeypatch):
    """The overrides each build was given; a build given 'make-it-fail' fails half-written."""
    got = []

    def fake_build(profile, out, cache="cache", overrides=(), quiet=False):
        got.append(list(overrides))
        out = Path(out)
        out.mkdir(parents=True)
        (out / "meta.json").write_text(json.dumps({"profile": profile, "record_encoding": 1, "n": len(got),
                                                   "domains": ["a"], "budget_tokens_per_domain": 1, "card": "c"}))
        if "seed=13" in overrides:
            raise RuntimeError("build failed")
        (out / "timing.json").write_text(json.dumps({"tokens": 1, "tokens_per_s": 1, "workers": 1}))
        return json.loads((out / "meta.json").read_text())

    monkeypatch.setattr(data_prep.build, "build", fake_build)
    return got


def _n(out: Path) -> int:
    return json.loads((out / "meta.json").read_text())["n"]


def test_up_to_date_is_kept_untouched(tmp_path, builds, capsys):
    out = tmp_path / "demo"
    assert build_reused("tiny", out, overrides=["workers=1"])["n"] == 1
    assert json.loads((out / BUILD_STAMP).read_text()) == build_stamp("tiny", ["workers=1"])
    assert integrity.verify(out, "data", hashes=True)  # the stamp went in before the seal
    before = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (out, out / "meta.json")]
    capsys.readouterr()
    assert build_reused("tiny", out, overrides=["workers=1"]) is None
    assert capsys.readouterr().out == f"{out}: up to date\n"
    assert len(builds) == 1
    assert [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (out, out / "meta.json")] == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left


def test_other_data_prep_code_is_rebuilt(tmp_path, builds, capsys, monkeypatch):
    out = tmp_path / "demo"
    build_reused("tiny", out)
    monkeypatch.setattr(data_prep.stamp, "data_code_digest", lambda root=None: "0" * 64)  # after a git pull
    assert build_reused("tiny", out)["n"] == 2 and _n(out) == 2
    assert f"{out}: rebuilding (built with another code_sha256)" in capsys.readouterr().out
    assert json.loads((out / BUILD_STAMP).read_text())["code_sha256"] == "0" * 64


def test_other_overrides_or_profile_is_rebuilt(tmp_path, builds, capsys):
    out = tmp_path / "demo"
    build_reused("tiny", out)
    build_reused("tiny", out, overrides=["workers=1"])
    assert len(builds) == 2 and _n(out) == 2
    assert "rebuilding (built with another overrides)" in capsys.readouterr().out
    build_reused("demo", out, overrides=["workers=1"])
    assert _n(out) == 3
    assert "rebuilding (built with another profile, profile_sha256)" in capsys.readouterr().out


def test_an_edited_profile_file_is_rebuilt(tmp_path, builds, capsys):
    """A profile given as a path lies outside the data_prep code: its bytes are stamped."""
    profile = tmp_path / "mine.yaml"
    profile.write_text((data_prep.stamp.ROOT / "data_prep" / "profiles" / "tiny.yaml").read_text())
    out = tmp_path / "data" / "mine"
    build_reused(str(profile), out)
    profile.write_text(profile.read_text() + "\n# edited\n")  # its bytes are stamped, not its keys
    build_reused(str(profile), out)
    assert len(builds) == 2
    assert "rebuilding (built with another profile_sha256)" in capsys.readouterr().out


def test_another_hf_tokenizer_is_rebuilt(tmp_path, builds, capsys):
    """The tokenizer is stamped by the bytes of its files, not its path."""
    tok = tmp_path / "base"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": "one"}')
    args = ["tokenizer.kind=hf", f"tokenizer.hf_path={tok}"]
    out = tmp_path / "data" / "hf"
    build_reused("tiny", out, overrides=args)
    build_reused("tiny", out, overrides=args)
    assert len(builds) == 1
    (tok / "tokenizer.json").write_text('{"model": "another"}')
    build_reused("tiny", out, overrides=args)
    assert len(builds) == 2
    assert "rebuilding (built with another tokenizer_sha256)" in capsys.readouterr().out


def test_a_folder_without_a_stamp_is_rebuilt(tmp_path, builds, capsys):
    """Built before stamps: its meta.json has record_encoding, which was all the old check read."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"record_encoding": "whole-text", "n": 0}))
    build_reused("tiny", out)
    assert len(builds) == 1 and _n(out) == 1
    assert f"{out}: rebuilding (built before its stamp was recorded)" in capsys.readouterr().out


def test_a_failed_rebuild_leaves_the_old_folder(tmp_path, builds):
    out = tmp_path / "demo"
    build_reused("tiny", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="build failed"):
        build_reused("tiny", out, overrides=["seed=13"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def _cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["python -m data_prep.build", *argv])
    data_prep.build.main()


def test_the_cli(tmp_path, builds, capsys, monkeypatch):
    """--reuse: one line when up to date; without it, built again, stamped all the same (so `make data` then
    `make demo` reuses the folder)."""
    monkeypatch.chdir(tmp_path)
    _cli(monkeypatch, "--profile", "tiny", "--out", "data/demo", "--reuse")
    assert "wrote data/demo" in capsys.readouterr().out
    ino = os.stat("data/demo").st_ino
    _cli(monkeypatch, "--profile", "tiny", "--out", "data/demo", "--reuse")
    assert capsys.readouterr().out == "data/demo: up to date\n" and os.stat("data/demo").st_ino == ino
    _cli(monkeypatch, "--profile", "tiny", "--out", "data/demo")  # no --reuse: rebuilt, and stamped
    assert len(builds) == 2 and os.stat("data/demo").st_ino != ino and "wrote data/demo" in capsys.readouterr().out
    _cli(monkeypatch, "--profile", "tiny", "--out", "data/demo", "--reuse")
    assert capsys.readouterr().out == "data/demo: up to date\n" and len(builds) == 2
    with pytest.raises(SystemExit):  # a bad override: refused in one line before anything is read or built
        _cli(monkeypatch, "--profile", "tiny", "--out", "data/demo", "--reuse", "no_such_key=1")
    assert "desmoe: error:" in capsys.readouterr().err and len(builds) == 2
