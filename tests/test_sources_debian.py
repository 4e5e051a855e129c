"""Debian sources on a machine as its image comes: stale package lists, pinned versions that are gone.

Real apt-get and real downloads; the only thing staged is the state of a fresh machine: its package
lists are those of the release alone (no -security / -updates), copied into a private APT_CONFIG so the
machine's own lists are never touched, and a pin that Debian has superseded.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from data_prep import content
from data_prep.sources import SourceCache, load_manifest
from desmoe.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "data_prep" / "manifest.yaml"
GONE = "0.0-0desmoe1"  # a Debian version string no archive has ever published


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    pytest.skip("not a Debian machine: no VERSION_CODENAME in /etc/os-release")


@pytest.fixture
def stale_apt(tmp_path, monkeypatch) -> Path:
    """An APT_CONFIG whose lists are the release's own only, as on a fresh machine image."""
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get on this machine")
    d = tmp_path / "apt"
    (d / "lists" / "partial").mkdir(parents=True)
    (d / "cache" / "archives" / "partial").mkdir(parents=True)
    for f in Path("/var/lib/apt/lists").glob(f"*_dists_{_codename()}_*"):
        shutil.copy(f, d / "lists" / f.name)
    conf = d / "apt.conf"
    conf.write_text(f'Dir::State::Lists "{d}/lists/";\nDir::Cache "{d}/cache/";\n')
    monkeypatch.setenv("APT_CONFIG", str(conf))
    return d


def _variant(tmp_path: Path, name: str, *, version: str | None = None, drift: str | None = None,
             alter: int = 0) -> object:
    """Source ``name`` from the project manifest with another pin, drift rule, or ``alter`` files of its
    content list changed (what a list recorded from an older version of the package looks like)."""
    src = load_manifest(MANIFEST)[name]
    entries = content.parse(src.content_list.read_text(), str(src.content_list))
    for path in sorted(entries)[:alter]:
        entries[path] = ("0" * 64, entries[path][1])
    lists = tmp_path / "content"
    lists.mkdir(exist_ok=True)
    text = content.render(entries)
    (lists / f"{name}.txt").write_text(text)
    return replace(src, version=version or src.version, drift=src.drift if drift is None else drift,
                   content=content.digest(text), content_dir=str(lists))


def test_superseded_version_with_identical_files_is_used_and_recorded(tmp_path, stale_apt):
    src = _variant(tmp_path, "images-emoji-symbola", version=GONE)  # 1.3 MB
    folder = SourceCache(tmp_path / "cache").unpack(src)
    res = SourceCache(tmp_path / "cache").resolution(src)
    assert res["pinned"] == GONE and res["used"] not in ("", GONE) and res["content"] == "identical"
    assert (folder / src.paths[0]).stat().st_size > 1_000_000


def test_superseded_version_with_other_files_is_refused_in_one_line(tmp_path, stale_apt):
    src = _variant(tmp_path, "images-emoji-symbola", version=GONE, alter=1)
    with pytest.raises(UserError) as err:
        SourceCache(tmp_path / "cache").unpack(src)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"source 'images-emoji-symbola': Debian replaced fonts-symbola {GONE} by ")
    assert "(1 changed of 1 files" in msg and "Symbola_hint.ttf" in msg
    assert not (tmp_path / "cache" / "unpacked" / "apt" / f"fonts-symbola-{GONE}").exists()


def test_declared_drift_is_accepted_written_down_and_not_reused_by_a_strict_pin(tmp_path, stale_apt):
    cache = SourceCache(tmp_path / "cache")
    tolerant = _variant(tmp_path, "images-emoji-symbola", version=GONE, alter=1, drift="a test says so")
    cache.unpack(tolerant)
    res = cache.resolution(tolerant)
    assert res["content"] == "drift" and res["drift"]["changed"] == [tolerant.paths[0]]
    assert res["drift"]["accepted_because"] == "a test says so"
    strict = replace(tolerant, drift="")  # same pin and list, no drift allowed: the cached acceptance must not leak
    with pytest.raises(UserError, match="whose files differ from the recorded ones"):
        cache.unpack(strict)


def test_a_package_debian_does_not_have_is_named(tmp_path, stale_apt):
    src = replace(_variant(tmp_path, "images-emoji-symbola"), package="desmoe-no-such-package", version="1.0")
    with pytest.raises(UserError, match=r"^source 'images-emoji-symbola': Debian has no desmoe-no-such-package "
                                        r"\(pinned 1\.0; "):
        SourceCache(tmp_path / "cache").unpack(src)


@pytest.mark.parametrize("extra,message", [
    ("", "a Debian source needs 'paths' and 'content'"),
    ("  paths: [/etc]\n  content: " + "a" * 64 + "\n", "key 'paths': expected a list of relative paths"),
    ("  paths: [usr/x]\n  content: abc\n", "key 'content': expected 64 hex digits"),
])
def test_debian_manifest_entries_need_paths_and_content(tmp_path, extra, message):
    path = tmp_path / "manifest.yaml"
    path.write_text("x:\n  kind: apt\n  package: a\n  version: '1'\n  sha256: " + "a" * 64 + "\n  licence: MIT\n"
                    + extra)
    with pytest.raises(ConfigError, match=message):
        load_manifest(path)


def test_every_content_list_matches_its_pin():
    for src in load_manifest(MANIFEST).values():
        if src.kind == "apt":
            assert content.recorded(src.name, src.content, src.content_list), src.name


def test_sources_check_refreshes_stale_lists_and_prints_the_table(stale_apt):
    proc = subprocess.run([sys.executable, "-m", "data_prep.sources", "--check", "--profile", "tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == ["| source", "kind", "pinned", "available", "status |"]
    by_name = {r[0][2:]: r for r in rows[1:]}
    assert {"python-docs", "dictionary-gcide", "law-india"} <= set(by_name)
    assert all(r[4] == "ok |" for r in by_name.values()), proc.stdout


def test_tiny_profile_builds_from_an_empty_cache_with_stale_lists_and_a_superseded_pin(tmp_path, stale_apt):
    """The fresh-machine case end to end: nothing cached, the release's lists only (they lack the pinned
    python3.11-doc, a security update), and that pin superseded with one recorded file different."""
    from data_prep.build import build

    manifest = tmp_path / "manifest.yaml"
    text = MANIFEST.read_text()
    docs = _variant(tmp_path, "python-docs", version=GONE, alter=1)
    pinned = load_manifest(MANIFEST)["python-docs"]
    text = text.replace(f'version: "{pinned.version}"', f'version: "{GONE}"').replace(pinned.content, docs.content)
    manifest.write_text(text)
    for f in (ROOT / "data_prep" / "content").glob("*.txt"):
        if not (tmp_path / "content" / f.name).exists():
            shutil.copy(f, tmp_path / "content" / f.name)
    meta = build("tiny", tmp_path / "tiny", cache=tmp_path / "cache", overrides=[f"manifest={manifest}"], quiet=True)
    p = meta["packages"]["python-docs"]
    assert p["version"] == GONE and p["used_version"] != GONE and p["content"] == "drift"
    assert p["drift"]["summary"].startswith("1 changed of ") and p["drift"]["accepted_because"] == pinned.drift
    gcide = meta["packages"]["dictionary-gcide"]
    assert gcide["used_version"] == gcide["version"] and gcide["content"] == "identical"
    assert json.loads((tmp_path / "tiny" / "meta.json").read_text())["packages"] == meta["packages"]
    card = (tmp_path / "tiny" / "DATA_CARD.md").read_text()
    assert "## Drift from the pinned sources" in card and f"(pinned {GONE}: drift files)" in card
    assert all(meta["counts"][d]["train"]["tokens"] > 0 for d in meta["domains"])
