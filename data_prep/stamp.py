"""What a prepared data folder was built from, kept in the folder so a later build can tell whether to reuse it.

A folder built by older data_prep code, another profile, other overrides or another tokenizer was reused
silently (the old check only read ``"record_encoding"`` in its meta.json), and every number computed from it
then came from data the current code would not produce.  A stamp names the data-preparation code (a digest),
the profile (its name and the digest of its file), the overrides and the tokenizer's files (a digest, when
it is an HF folder); a folder whose stamp differs, or that has none, is rebuilt beside it and renamed in.
Used by ``python -m data_prep.build --reuse`` (``BUILD_STAMP``) and launcher/realbase.py (its own stamp file).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from desmoe.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BUILD_STAMP = "build-stamp.json"

# The code is the data_prep package (its profiles, pinned sources and content lists too; the image sequence's
# builder is no part of a text build) and the desmoe modules that encode documents and records.
DATA_CODE = ("data_prep", "desmoe/data/tokenizer.py", "desmoe/data/prepared.py")
DATA_CODE_SKIP = ("images.py", "image_sources.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def tokenizer_digest(folder: Path) -> str:
    """sha256 over an HF tokenizer folder's tokenizer files (name and bytes): the tokenizer's identity, not
    its path."""
    from desmoe.integrity import sha256_file

    folder = Path(folder)
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not files:
        raise UserError(f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    return hashlib.sha256("".join(f"{f.name}\0{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def data_code_digest(root: Path = ROOT) -> str:
    """sha256 of DATA_CODE (*.py, *.yaml, *.txt; DATA_CODE_SKIP left out): the code that writes a data folder."""
    from desmoe.integrity import tree_digest

    return hashlib.sha256("".join(f"{rel} {tree_digest(root / rel, ('.py', '.yaml', '.txt'), DATA_CODE_SKIP)}\n"
                                  for rel in DATA_CODE).encode()).hexdigest()


def build_stamp(profile: str, overrides: list[str], code_sha256: Optional[str] = None) -> dict:
    """The stamp ``python -m data_prep.build --profile <profile> <overrides>`` writes with --reuse.  The profile's
    file is digested as well as named: a profile given as a path lies outside DATA_CODE.  The tokenizer folder
    and user data are digested by content: a path names whatever is there now."""
    from desmoe.integrity import tree_digest
    from data_prep.config import PROFILES, load_profile

    cfg = load_profile(profile, list(overrides))  # refuses an unknown profile or key in its own one line
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else PROFILES / f"{profile}.yaml"  # as load_profile
    stamp = {"profile": profile, "profile_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "overrides": list(overrides), "code_sha256": code_sha256 or data_code_digest()}
    if cfg.tokenizer.kind == "hf":
        stamp["tokenizer_sha256"] = tokenizer_digest(Path(cfg.tokenizer.hf_path))
    if cfg.user_data:
        stamp["user_data_sha256"] = tree_digest(Path(cfg.user_data))
    return stamp


def read_stamp(folder: Path, name: str) -> Optional[dict]:
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.is_file() else None


def stale_reason(have: Optional[dict], want: dict) -> str:
    """Why a folder stamped ``have`` is not one built for ``want`` ('' when it is)."""
    if have == want:
        return ""
    if have is None:
        return "built before its stamp was recorded"
    keys = [*want, *(k for k in have if k not in want)]
    return "built with another " + ", ".join(k for k in keys if have.get(k) != want.get(k))


def rebuild_stamped(out: Path, stamp: dict, name: str, write: Callable[[Path], object]) -> object:
    """``write(folder)`` into a temporary folder beside ``out``, stamp it, seal it and rename it in: a failed
    build leaves the old folder as it was, and the stamp is one of the sealed files."""
    from desmoe.checkpoint import replace_dir_atomic, write_text_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        result = write(tmp / out.name)
        write_text_atomic(tmp / out.name / name, json.dumps(stamp, indent=1) + "\n")
        replace_dir_atomic(tmp / out.name, out, seal=True)  # sealed again: the stamp is one of its files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def build_reused(profile: str, out: str | Path, cache: str | Path = "cache", overrides: list[str] = (),
                 quiet: bool = False, reuse: bool = True) -> dict | None:
    """``--reuse``: None when ``out`` holds the stamp this build would write (one line says so); else built,
    stamped and renamed in (a failed build leaves the old folder).  A folder without a stamp was built before
    stamps, by code that may differ: rebuilt, as one of another profile, overrides, code or tokenizer."""
    import data_prep.build  # at call time: the build function as data_prep.build has it now

    out, overrides = Path(out), list(overrides)
    want = build_stamp(profile, overrides)
    if out.exists() and reuse:  # without --reuse every build is a rebuild, stamped all the same
        why = stale_reason(read_stamp(out, BUILD_STAMP), want)
        if not why:
            print(f"{out}: up to date", flush=True)
            return None
        print(f"{out}: rebuilding ({why})", flush=True)
    return rebuild_stamped(out, want, BUILD_STAMP,
                           lambda tmp: data_prep.build.build(profile, tmp, cache, overrides, quiet))
