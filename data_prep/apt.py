"""Debian packages as sources: package lists that may be stale, pinned versions that may be gone.

A machine image's package lists are a snapshot (often without bookworm-security/-updates), and the
archive keeps only the current version of each package.  So ``apt-get download pkg=ver`` fails in two
ways that are not the user's fault: the lists are old (refresh them, then retry) or the version was
superseded (take the archive's current version; the caller then checks its files against the recorded
content list).  Every client call honours ``APT_CONFIG`` from the environment.
"""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from desmoe.errors import UserError

# apt-get's words for "this package/version is not in the lists I have"
NOT_FOUND = ("Unable to locate package", "was not found", "has no installation candidate",
             "Couldn't find any package")

_refresh_lock = threading.Lock()
_refreshed: set[str] = set()  # the APT_CONFIGs whose lists this process has refreshed


def _run(argv: list[str], cwd: Path | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UserError(f"the apt client '{argv[0]}' is not installed (Debian sources need apt-get)") from None


def refresh() -> str:
    """``apt-get update`` once per process and apt configuration; returns '' or the client's last error line."""
    key = os.environ.get("APT_CONFIG", "")
    with _refresh_lock:
        if key in _refreshed:
            return ""
        proc = _run(["apt-get", "update", "-qq"], timeout=900)
        if proc.returncode == 0:
            _refreshed.add(key)
            return ""
        return (proc.stderr.strip().splitlines() or ["no output"])[-1]


def not_found(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode != 0 and any(w in proc.stderr for w in NOT_FOUND)


def candidate(package: str) -> str | None:
    """The version ``apt-get download package`` would take now, or None if the lists do not know it."""
    proc = _run(["apt-cache", "policy", package], timeout=120)
    for line in proc.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            return None if version in ("", "(none)") else version
    return None


def versions(package: str) -> list[str]:
    """Every version the current lists offer (``apt-cache madison``), newest first."""
    proc = _run(["apt-cache", "madison", package], timeout=120)
    return list(dict.fromkeys(line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.count("|") >= 2))


def download(name: str, package: str, version: str, tmp: Path, allow_other: bool = True) -> tuple[Path, str]:
    """(archive, version it holds): the pinned version, else (allow_other) the archive's current one."""
    proc = _run(["apt-get", "download", f"{package}={version}"], cwd=tmp)
    if not_found(proc):
        refresh()  # stale lists are the common case on a fresh machine image
        proc = _run(["apt-get", "download", f"{package}={version}"], cwd=tmp)
    used = version
    if not_found(proc):
        current = candidate(package)
        if current is None:
            why = refresh() or "the package is not in any list"
            raise UserError(f"source '{name}': Debian has no {package} (pinned {version}; {why})")
        if not allow_other:
            raise UserError(f"source '{name}': Debian no longer has {package}={version} (current: {current})")
        used = current
        proc = _run(["apt-get", "download", f"{package}={used}"], cwd=tmp)
    files = [p for p in tmp.iterdir() if p.is_file() and p.suffix == ".deb"]
    if proc.returncode or len(files) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"source '{name}': apt could not fetch {package}={used}: {last}")
    return files[0], used
