"""``python -m data_prep.sources --check``: every pinned source against the registries, as a table.

Run it before a release.  PyPI and npm never change a published version, so for them the check asks the
registry's own client whether the pinned version is still listed (``--download`` also fetches it and
checks its sha256).  Debian replaces versions: the check refreshes stale package lists when the pin is
not in them, and when the archive has moved on it downloads the current version and compares its files
with the recorded content list, exactly as a build would.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_prep import apt
from data_prep.sources import Source, SourceCache
from desmoe.errors import UserError


@dataclass
class Row:
    source: str
    kind: str
    pinned: str
    available: str
    status: str


def _listed(src: Source) -> tuple[bool, str]:
    """(pinned version listed, newest listed) from pip's or npm's client, without downloading."""
    if src.kind == "pip":
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "--disable-pip-version-check",
                               src.package], capture_output=True, text=True, timeout=300)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("Available versions:")), "")
        known = [v.strip() for v in line.split(":", 1)[1].split(",")] if line else []
    else:
        proc = subprocess.run(["npm", "view", src.package, "versions", "--json"], capture_output=True, text=True,
                              timeout=300)
        try:
            known = json.loads(proc.stdout or "[]")
        except ValueError:
            known = []
        known = [known] if isinstance(known, str) else list(reversed(known))
    if not known:
        last = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise UserError(f"source '{src.name}': the registry listed no versions of {src.package}: {last}")
    return src.version in known, known[0]


def check_one(src: Source, cache: SourceCache, download: bool) -> Row:
    row = Row(src.name, src.kind, src.version, "", "")
    try:
        if src.kind == "apt":
            if src.version not in apt.versions(src.package):
                apt.refresh()
            offered = apt.versions(src.package)
            row.available = ", ".join(offered) or "none"
            if src.version in offered and not download:
                row.status = "ok"
                return row
            cache.unpack(src)  # downloads and compares the files, as a build would; refuses what a build refuses
            res = cache.resolution(src)
            row.status = ("ok" if res["used"] == src.version else
                          f"superseded by {res['used']}: files identical, used" if res["content"] == "identical" else
                          f"superseded by {res['used']}: DRIFT accepted ({res['drift']['summary']}; {src.drift})")
            return row
        listed, newest = _listed(src)
        row.available = newest if listed and newest == src.version else f"{src.version} (newest {newest})" \
            if listed else f"newest {newest}"
        if not listed:
            row.status = "MISSING: the pinned version is not listed"
        elif download:
            cache.fetch(src)
            row.status = "ok (downloaded, sha256 verified)"
        else:
            row.status = "ok"
    except UserError as err:
        row.status = f"FAILED: {err}"
    return row


def check(sources: list[Source], download: bool = False, cache_root: Path | None = None) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="desmoe-source-check-") as tmp:
        cache = SourceCache(cache_root or tmp)  # an empty cache: nothing on this machine can hide a gone version
        return [check_one(s, cache, download) for s in sources]


def table(rows: list[Row]) -> str:
    lines = ["| source | kind | pinned | available | status |", "|---|---|---|---|---|"]
    lines += [f"| {r.source} | {r.kind} | {r.pinned} | {r.available} | {r.status} |" for r in rows]
    return "\n".join(lines)


def failed(rows: list[Row]) -> bool:
    return any(r.status.startswith(("FAILED", "MISSING")) for r in rows)
