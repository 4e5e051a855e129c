"""The real base's probe folder (launcher/realbase.py ``probe_set``) is reused only for the settings that built
it.  Before, an existing OUT/probes was reused whatever --probe-items said: a run asked for 200 items silently
scored the 50 built earlier.  A folder built by other probe code (its record's digest) is rebuilt when
generated (realbase.py) and refused when named by the user (the study).  No download: the folders are
written by hand in tmp_path, except the tiny data build (cached sources) that build_probes reads."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "launcher"))  # behind the package: a spawned rank must import desmoe/, not launcher/desmoe.py

import pytest  # noqa: E402
import realbase  # noqa: E402

from desmoe.errors import UserError  # noqa: E402
import desmoe.evaluation.probes as probes_mod  # noqa: E402
from desmoe.evaluation.probes import BUILD_RECORD, build_settings, check_probe_code, probe_code  # noqa: E402


@pytest.fixture
def built(tmp_path):
    """(a data folder with a meta.json, a probe folder stamped as built from it with 50 items)."""
    data, probes = tmp_path / "data", tmp_path / "probes"
    data.mkdir()
    probes.mkdir()
    (data / "meta.json").write_text(json.dumps({"profile": "demo", "seed": 0}))
    (probes / "probes.json").write_text(json.dumps({"probe_arith": {"metric": "exact_match", "items": 50}}))
    (probes / BUILD_RECORD).write_text(json.dumps(build_settings(data, 50)))
    return data, probes


def test_same_settings_reuse_the_folder(built):
    data, probes = built
    before = (probes / "probes.json").read_text()
    assert realbase.probe_set(data, probes, 50) == probes
    assert (probes / "probes.json").read_text() == before


def test_other_probe_items_are_refused_in_one_line(built):
    data, probes = built
    with pytest.raises(UserError) as err:
        realbase.probe_set(data, probes, 200)
    assert str(err.value) == (f"{probes}: built with n=50 (asked for 200) (n: --probe-items; data_meta_sha256: "
                              f"{data / 'meta.json'}); remove the folder to build the probes again")


def test_other_data_is_refused(built):
    data, probes = built
    (data / "meta.json").write_text(json.dumps({"profile": "demo", "seed": 1}))  # a rebuilt data folder
    with pytest.raises(UserError, match="data_meta_sha256=") as err:
        realbase.probe_set(data, probes, 50)
    assert "\n" not in str(err.value)


def test_a_folder_without_its_record_is_refused(built):
    """Built before the record existed: its item count and data are unknown, so it is not reused silently."""
    data, probes = built
    (probes / BUILD_RECORD).unlink()
    with pytest.raises(UserError, match="built before its settings were recorded"):
        realbase.probe_set(data, probes, 50)


@pytest.fixture
def rebuilt(built, monkeypatch):
    """``built``, with build_probes replaced by a recorder that stamps the folder as today's code would."""
    data, probes = built
    calls = []

    def fake(data_root, out, n=50):
        calls.append(n)
        (Path(out) / BUILD_RECORD).write_text(json.dumps(build_settings(data_root, n)))

    monkeypatch.setattr(probes_mod, "build_probes", fake)
    return data, probes, calls


def test_a_folder_of_other_probe_code_is_rebuilt(rebuilt, capsys):
    """The folder is generated here: items written by other code are written again, not scored."""
    data, probes, calls = rebuilt
    (probes / BUILD_RECORD).write_text(json.dumps({**build_settings(data, 50), "code": "0" * 16}))
    assert realbase.probe_set(data, probes, 50) == probes
    assert calls == [50] and json.loads((probes / BUILD_RECORD).read_text())["code"] == probe_code()
    assert f"{probes}: rebuilding (built by other probe code)" in capsys.readouterr().out
    realbase.probe_set(data, probes, 50)
    assert calls == [50]  # now current: reused


def test_a_record_from_before_the_code_digest_is_rebuilt(rebuilt):
    data, probes, calls = rebuilt
    old = {k: v for k, v in build_settings(data, 50).items() if k != "code"}
    (probes / BUILD_RECORD).write_text(json.dumps(old))
    realbase.probe_set(data, probes, 50)
    assert calls == [50]


def test_other_code_and_other_items_are_refused(rebuilt):
    """Only a code difference is rebuilt: other settings are the user's to decide (the folder is refused)."""
    data, probes, calls = rebuilt
    (probes / BUILD_RECORD).write_text(json.dumps({**build_settings(data, 50), "code": "0" * 16}))
    with pytest.raises(UserError, match=r"built with n=50 \(asked for 200\), code='0000000000000000'"):
        realbase.probe_set(data, probes, 200)
    assert calls == []


def test_a_user_named_folder_of_other_code_is_refused_in_one_line(built):
    """launcher/realbase_study.py reads the folder its config names: refused, not rebuilt."""
    data, probes = built
    check_probe_code(probes)  # today's code: accepted
    (probes / BUILD_RECORD).write_text(json.dumps({**build_settings(data, 50), "code": "0" * 16}))
    with pytest.raises(UserError) as err:
        check_probe_code(probes)
    assert str(err.value) == (f"{probes / BUILD_RECORD}: the probe folder was built by other probe code "
                              f"(code='0000000000000000', this code {probe_code()!r}); build it again (make "
                              f"realbase, or remove the folder and run launcher/realbase.py)")
    (probes / BUILD_RECORD).unlink()
    with pytest.raises(UserError, match="the probe folder has no build record; build it again"):
        check_probe_code(probes)


def test_the_probe_code_digest_covers_the_item_code(monkeypatch, tmp_path):
    before = probe_code()
    for f in probes_mod.PROBE_CODE:
        copy = tmp_path / f.name
        copy.write_bytes(f.read_bytes() + b"\n# edited\n")
        monkeypatch.setattr(probes_mod, "PROBE_CODE", tuple(copy if g == f else g for g in probes_mod.PROBE_CODE))
        assert probe_code() != before, f.name
        monkeypatch.undo()
    assert probe_code() == before


def test_build_probes_writes_a_whole_folder_or_none(tiny_data, tmp_path, monkeypatch):
    """Built beside the folder and renamed in: the YAMLs name the final folder's files, and a rebuild that
    fails half way leaves the old folder whole (before, new items could lie under the old build record)."""
    out = tmp_path / "probes"
    probes_mod.build_probes(tiny_data, out, n=4)
    record = json.loads((out / BUILD_RECORD).read_text())
    assert record == build_settings(tiny_data.resolve(), 4)
    assert f"test: {(out / 'probe_arith.jsonl').resolve()}" in (out / "probe_arith.yaml").read_text()
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def broken(sets, tmp, dest=None):
        (Path(tmp) / "probe_arith.jsonl").write_text("half\n")
        raise RuntimeError("disk full")

    monkeypatch.setattr(probes_mod, "write_tasks", broken)
    with pytest.raises(RuntimeError):
        probes_mod.build_probes(tiny_data, out, n=6)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["probes"]


def test_the_study_refuses_probes_of_other_code_before_it_starts(built, tmp_path, monkeypatch, capsys):
    """launcher/realbase_study.py, with its config's probe folder built by other probe code: one line, exit 2,
    before the ranks start (its rows would compare scores on other items than the base's)."""
    import importlib.util

    data, probes = built
    (probes / BUILD_RECORD).write_text(json.dumps({**build_settings(data, 50), "code": "0" * 16}))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("realbase_study", ROOT / "launcher" / "realbase_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setattr(sys, "argv", ["realbase_study.py", "--config", str(ROOT / "configs" / "realbase_study.yaml"),
                                      f"study.scores.probes={probes}", f"experiment.base.hf={tmp_path / 'base'}"])
    with pytest.raises(SystemExit) as exit_:
        study.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"desmoe: error: {probes / BUILD_RECORD}: the probe folder was built by other probe code")
