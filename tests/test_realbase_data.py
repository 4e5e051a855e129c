"""data/realbase (launcher/realbase.py ``prepared_data``) is reused only when its stamp names this tokenizer
and this data-preparation code.  Before, any folder whose meta.json mentioned "record_encoding" was reused:
one built with another tokenizer, or by older data_prep code, was read silently and every perplexity and
probe number was wrong.  No download: data_prep's build is replaced by a writer of a tiny folder."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "launcher"))  # behind the package: a spawned rank must import desmoe/, not launcher/desmoe.py

import pytest  # noqa: E402
import realbase  # noqa: E402

import data_prep.build  # noqa: E402
from desmoe import integrity  # noqa: E402


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """(dense base with tokenizer files, the data folder, the builds so far: the overrides each was given)."""
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "tokenizer.json").write_text('{"model": "smollm2"}')
    (dense / "tokenizer_config.json").write_text("{}")
    builds = []

    def fake_build(profile, out, cache, overrides, quiet=False):
        builds.append(list(overrides))
        if "make-it-fail" in overrides:
            raise RuntimeError("build failed")
        out.mkdir(parents=True)
        (out / "meta.json").write_text(json.dumps({"profile": profile, "record_encoding": 1, "n": len(builds)}))

    monkeypatch.setattr(data_prep.build, "build", fake_build)
    return dense, tmp_path / "data" / "realbase", builds


def _stamp(data: Path) -> dict:
    return json.loads((data / realbase.DATA_STAMP).read_text())


def test_built_once_stamped_sealed_and_reused(setup):
    dense, data, builds = setup
    assert realbase.prepared_data(dense, Path("cache"), data) == data
    assert len(builds) == 1 and builds[0] == ["tokenizer.kind=hf", f"tokenizer.hf_path={dense}"]
    assert _stamp(data) == realbase.data_stamp(dense)
    assert integrity.verify(data, "data", hashes=True)  # the stamp went in before the seal
    assert "realbase-stamp.json" in integrity.read_manifest(data, "data")["files"]
    realbase.prepared_data(dense, Path("cache"), data)
    assert len(builds) == 1
    assert [p.name for p in data.parent.iterdir()] == ["realbase"]  # no temporary folder left


def test_another_tokenizer_is_rebuilt(setup, capsys):
    dense, data, builds = setup
    realbase.prepared_data(dense, Path("cache"), data)
    (dense / "tokenizer.json").write_text('{"model": "another"}')  # same path, other bytes
    realbase.prepared_data(dense, Path("cache"), data)
    assert len(builds) == 2 and json.loads((data / "meta.json").read_text())["n"] == 2
    assert _stamp(data)["tokenizer_sha256"] == realbase.tokenizer_digest(dense)
    assert f"{data}: rebuilding (built with another tokenizer_sha256)" in capsys.readouterr().out


def test_other_data_prep_code_is_rebuilt(setup, capsys):
    dense, data, builds = setup
    realbase.prepared_data(dense, Path("cache"), data)
    stamp = _stamp(data)
    (data / realbase.DATA_STAMP).write_text(json.dumps({**stamp, "code_sha256": "0" * 64}))  # older data_prep
    realbase.prepared_data(dense, Path("cache"), data)
    assert len(builds) == 2 and _stamp(data) == stamp
    assert "rebuilding (built with another code_sha256)" in capsys.readouterr().out


def test_a_folder_without_a_stamp_is_rebuilt(setup, capsys):
    """Built before the stamp (its meta.json has record_encoding, which was all the old check read)."""
    dense, data, builds = setup
    data.mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"record_encoding": 1, "n": 0}))
    realbase.prepared_data(dense, Path("cache"), data)
    assert len(builds) == 1 and json.loads((data / "meta.json").read_text())["n"] == 1
    assert "rebuilding (built before its stamp was recorded)" in capsys.readouterr().out


def test_a_failed_rebuild_leaves_the_old_folder(setup, monkeypatch):
    dense, data, builds = setup
    realbase.prepared_data(dense, Path("cache"), data)
    before = (data / "meta.json").read_text()
    (dense / "tokenizer.json").write_text('{"model": "another"}')
    monkeypatch.setattr(realbase, "PROFILE", ("demo", ("tokenizer.kind=hf", "make-it-fail")))
    with pytest.raises(RuntimeError):
        realbase.prepared_data(dense, Path("cache"), data)
    assert (data / "meta.json").read_text() == before
    assert [p.name for p in data.parent.iterdir()] == ["realbase"]


def test_the_code_digest_covers_data_prep_and_the_encoders(tmp_path):
    """A changed data_prep module, profile or encoder changes the digest; the image builder does not."""
    for rel in ("data_prep", "desmoe/data"):
        shutil.copytree(ROOT / rel, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
    base = realbase.data_code_digest(tmp_path)
    for rel, moves in (("data_prep/tokens.py", True), ("data_prep/profiles/demo.yaml", True),
                       ("desmoe/data/tokenizer.py", True), ("data_prep/images.py", False)):
        f = tmp_path / rel
        old = f.read_text()
        f.write_text(old + "\n# edited\n")
        assert (realbase.data_code_digest(tmp_path) != base) == moves, rel
        f.write_text(old)
    assert realbase.data_code_digest(tmp_path) == base == realbase.data_code_digest()


def test_no_tokenizer_files_is_one_line(tmp_path):
    with pytest.raises(realbase.UserError, match=r"no tokenizer files \(expected one of tokenizer.json"):
        realbase.tokenizer_digest(tmp_path)


def test_the_gpu_script_refuses_data_of_other_code_before_the_device_runs(tmp_path, monkeypatch, setup):
    """launcher/realbase_gpu.py: a carried data/realbase of other data_prep code would be rebuilt by the base
    stage, and the device has not the sources; refused among the missing inputs, before any stage."""
    dense, _, _ = setup
    spec = importlib.util.spec_from_file_location("realbase_gpu", ROOT / "launcher" / "realbase_gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    monkeypatch.chdir(tmp_path)
    assert gpu.stale_data() == []  # nothing carried: "not found" says it
    realbase.prepared_data(dense, Path("cache"), realbase.DATA)
    assert gpu.stale_data() == []
    stamp = _stamp(realbase.DATA)
    (realbase.DATA / realbase.DATA_STAMP).write_text(json.dumps({**stamp, "code_sha256": "0" * 64}))
    assert "data/realbase: was built by other data_prep code; rebuild it here with make realbase and carry it" \
        in gpu.missing(cpu=True)
    (realbase.DATA / realbase.DATA_STAMP).unlink()
    assert gpu.stale_data() == ["data/realbase: has no stamp (built before stamps); rebuild it here with make "
                                "realbase and carry it"]
