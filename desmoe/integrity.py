"""File manifests for what desmoe writes and later reads: prepared data, exported models, checkpoints.

A folder is *sealed* just before it is renamed into place: ``desmoe-manifest.json`` lists every file's
size and sha256, written atomically inside the folder, so the folder and its manifest appear together.
Opening a sealed folder always compares sizes (one ``stat`` per file: a truncated copy, a half-synced
disk, a file replaced by another) and, on request, hashes (``inspect_run``, ``--verify``).  A mismatch
is refused in one line naming the file, never read short.  Folders without a manifest (a user's own
checkpoint, or one written before manifests existed) are read as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from desmoe.errors import UserError

MANIFEST = "desmoe-manifest.json"
FORMAT = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(root: str | Path, suffixes: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> str:
    """sha256 over the files under ``root`` (those ending in ``suffixes``, or all; none named in ``exclude``),
    each its relative path and content digest, in path order: a folder's identity (a model base, a source
    tree); a file stands for itself."""
    root, digest = Path(root), hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                 and (not suffixes or p.suffix in suffixes) and p.name not in exclude)
    for f in files:
        digest.update(f"{f.relative_to(root.parent).as_posix()}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST
                  and not p.name.endswith(".tmp"))


def seal(folder: str | Path) -> dict:
    """Write ``folder/desmoe-manifest.json`` for every file now in ``folder``; returns the manifest."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_file(p)] for p in _files(folder)}
    manifest = {"format": FORMAT, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path, what: str) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and all(isinstance(v, list) and len(v) == 2 for v in files.values())
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{path}: {what} manifest is damaged (not the JSON desmoe writes)") from None
    return manifest


def verify(folder: str | Path, what: str, hashes: bool = False) -> bool:
    """Check ``folder`` against its manifest: sizes always, sha256 when ``hashes``.  Returns False when the
    folder has no manifest (nothing to check); raises a one-line UserError on any difference."""
    folder = Path(folder)
    manifest = read_manifest(folder, what)
    if manifest is None:
        return False
    for rel, (size, sha) in sorted(manifest["files"].items()):
        path = folder / rel
        if not path.is_file():
            raise UserError(f"{path}: missing from the {what} (its manifest lists it)")
        got = path.stat().st_size
        if got != size:
            kind = "truncated" if got < size else "longer than written"
            raise UserError(f"{path}: {what} file is {kind} ({got} bytes, the manifest says {size})")
        if hashes and sha256_file(path) != sha:
            raise UserError(f"{path}: {what} file was altered (sha256 differs from the manifest)")
    return True
