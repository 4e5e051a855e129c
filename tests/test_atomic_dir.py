"""replace_dir_atomic: a finished folder replaces the old one; a crash mid-swap never leaves nothing."""
import os

import pytest

from desmoe.checkpoint import replace_dir_atomic


def _folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_replace_dir_atomic_new_and_existing(tmp_path):
    final = tmp_path / "out"
    replace_dir_atomic(_folder(tmp_path / "a.partial", "one"), final)
    assert (final / "f.txt").read_text() == "one"
    replace_dir_atomic(_folder(tmp_path / "b.partial", "two"), final)
    assert (final / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging and old copy are gone


def test_replace_dir_atomic_crash_keeps_old_copy(tmp_path, monkeypatch):
    final = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / "new.partial", "new")
    real, calls = os.replace, []

    def crash_on_second(src, dst):  # the process dies after moving the old folder aside
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_dir_atomic(new, final)
    survivors = [p for p in tmp_path.iterdir() if (p / "f.txt").is_file()]
    assert {(p / "f.txt").read_text() for p in survivors} == {"old", "new"}
