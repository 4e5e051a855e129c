"""The real base's probe folder (launcher/realbase.py ``probe_set``) is reused only for the settings that built
it.  Before, an existing OUT/probes was reused whatever --probe-items said: a run asked for 200 items silently
scored the 50 built earlier.  No download: the folders are written by hand in tmp_path."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "launcher"))  # behind the package: a spawned rank must import desmoe/, not launcher/desmoe.py

import pytest  # noqa: E402
import realbase  # noqa: E402

from desmoe.errors import UserError  # noqa: E402
from desmoe.evaluation.probes import BUILD_RECORD, build_settings  # noqa: E402


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
