"""Users' domain folders named in another Unicode normal form (data_prep/user_data.py)."""
from __future__ import annotations

import json
import unicodedata

import pytest

from data_prep.user_data import user_docs
from desmoe.errors import ConfigError

NFC = "m\u00e9decine"  # "médecine" as a profile typed in an editor spells it (composed é)


def test_a_decomposed_folder_name_is_the_domain_it_spells(tmp_path):
    nfd = unicodedata.normalize("NFD", NFC)  # as macOS, and zips made there, store the folder's name
    assert nfd != NFC
    (tmp_path / nfd).mkdir()
    (tmp_path / nfd / "a.jsonl").write_text(json.dumps({"text": "Aspirin inhibits cyclooxygenase."}) + "\n")
    (tmp_path / NFC).mkdir()  # both spellings beside each other: one domain, both files
    (tmp_path / NFC / "b.txt").write_text("Insulin lowers blood glucose.")
    # before: "unknown domain 'médecine' (configured: médecine, ...)"
    got = user_docs(tmp_path, [NFC, "law"], "heldout")
    assert list(got) == [NFC]
    assert sorted(d.text for d in got[NFC]) == ["Aspirin inhibits cyclooxygenase.", "Insulin lowers blood glucose."]


def test_another_name_is_still_refused(tmp_path):
    (tmp_path / "medicine").mkdir()
    with pytest.raises(ConfigError) as err:
        user_docs(tmp_path, [NFC], "heldout")
    assert str(err.value).endswith(f"medicine: unknown domain 'medicine' (configured: {NFC}, held-out: heldout)")
