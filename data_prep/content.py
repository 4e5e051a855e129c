"""What a source's files are, independently of the archive that carried them.

Debian keeps only the current version of a package: a point or security release replaces the pinned
``.deb`` (new archive, new sha256) and the old one disappears from the archive.  The files the pipeline
reads often do not change with it (a font, a dictionary), and sometimes do (a security fix edits a few
pages of the Python docs).  A *content list* records, for the paths a source is read from, every file's
sha256, size and path.  It lives in ``data_prep/content/<source>.txt``; the manifest pins the list itself
by its sha256, so neither can change alone.  A substitute version is used only when its files equal the
list, or, for a source declared drift-tolerant, with the difference written down (never silently).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from desmoe.errors import UserError
from desmoe.integrity import sha256_file

LISTS = Path(__file__).resolve().parent / "content"


def scan(root: Path, paths: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, size)} of every regular file under each of ``paths`` inside ``root``."""
    out: dict[str, tuple[str, int]] = {}
    for rel in paths:
        top = root / rel
        if not top.exists():
            continue  # an absent path shows up as removed files in the comparison
        for f in ([top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file() and not p.is_symlink())):
            out[f.relative_to(root).as_posix()] = (sha256_file(f), f.stat().st_size)
    return out


def render(entries: dict[str, tuple[str, int]]) -> str:
    return "".join(f"{sha} {size} {path}\n" for path, (sha, size) in sorted(entries.items()))


def parse(text: str, where: str) -> dict[str, tuple[str, int]]:
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split(" ", 2)
        if len(parts) != 3 or len(parts[0]) != 64 or not parts[1].isdigit():
            raise UserError(f"{where}:{i}: expected '<sha256> <size> <path>', got {line[:80]!r}")
        out[parts[2]] = (parts[0], int(parts[1]))
    return out


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def recorded(name: str, pinned_digest: str, path: Path) -> dict[str, tuple[str, int]]:
    """The content list of source ``name`` (at ``path``), checked against the digest the manifest pins."""
    if not path.is_file():
        raise UserError(f"source '{name}': content list {path} not found (python -m data_prep.sources --record {name})")
    text = path.read_text()
    if digest(text) != pinned_digest:
        raise UserError(f"source '{name}': {path} does not match the manifest's 'content' sha256 "
                        f"(expected {pinned_digest}, got {digest(text)})")
    return parse(text, str(path))


@dataclass
class Drift:
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes_changed: int = 0
    files: int = 0  # files in the recorded list

    @property
    def none(self) -> bool:
        return not (self.changed or self.added or self.removed)

    def summary(self) -> str:
        if self.none:
            return "identical"
        parts = [f"{len(v)} {k}" for k, v in (("changed", self.changed), ("added", self.added),
                                                 ("removed", self.removed)) if v]
        return f"{', '.join(parts)} of {self.files} files ({self.bytes_changed:,} bytes)"

    def as_dict(self, limit: int = 50) -> dict:
        return {"summary": self.summary(), "changed": self.changed[:limit], "added": self.added[:limit],
                "removed": self.removed[:limit], "bytes_changed": self.bytes_changed}


def compare(want: dict[str, tuple[str, int]], got: dict[str, tuple[str, int]]) -> Drift:
    d = Drift(files=len(want))
    for path in sorted(set(want) | set(got)):
        if path not in got:
            d.removed.append(path)
            d.bytes_changed += want[path][1]
        elif path not in want:
            d.added.append(path)
            d.bytes_changed += got[path][1]
        elif want[path][0] != got[path][0]:
            d.changed.append(path)
            d.bytes_changed += max(want[path][1], got[path][1])
    return d
