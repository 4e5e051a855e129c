"""Users' own text: ``<folder>/<domain>/*.{jsonl,parquet,txt}`` enters the same pipeline.

- ``.jsonl``: one JSON object per line with a ``text`` field (``source``/``licence`` optional);
- ``.parquet``: a ``text`` column (``source``/``licence`` columns optional);
- ``.txt``: the whole file is one document.
A sub-folder whose name is not a configured domain (or the held-out set) is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from data_prep.extract import Doc
from desmoe.errors import ConfigError, UserError

SUFFIXES = (".jsonl", ".parquet", ".txt")


def user_docs(folder: str | Path, domains: list[str], heldout: str) -> dict[str, list[Doc]]:
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"key 'user_data': '{root}' is not a directory")
    out: dict[str, list[Doc]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name not in domains and sub.name != heldout:
            raise ConfigError(f"{sub}: unknown domain '{sub.name}' (configured: {', '.join(domains)}, "
                              f"held-out: {heldout})")
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        out[sub.name] = [d for f in files for d in _read(f, root)]
    return out


def _read(path: Path, root: Path) -> Iterator[Doc]:
    name = f"user:{path.relative_to(root)}"
    try:
        if path.suffix == ".txt":
            yield Doc(path.read_text(encoding="utf-8"), name, "user-supplied", "0")
        elif path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}: line {i + 1} is not valid JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise UserError(f"{path}: line {i + 1}: expected an object with a string field 'text'")
                yield Doc(row["text"], str(row.get("source", name)), str(row.get("licence", "user-supplied")),
                          str(i))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise UserError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
            cols = {c: table.column(c).to_pylist() for c in ("text", "source", "licence") if c in table.column_names}
            for i, text in enumerate(cols["text"]):
                if isinstance(text, str):
                    yield Doc(text, str(cols.get("source", [name] * (i + 1))[i]),
                              str(cols.get("licence", ["user-supplied"] * (i + 1))[i]), str(i))
    except UnicodeDecodeError:
        raise UserError(f"{path}: unreadable user file (not UTF-8 text)") from None
    except OSError as err:
        raise UserError(f"{path}: unreadable user file ({err.strerror or type(err).__name__})") from None
    except Exception as err:  # pyarrow's errors for a corrupt parquet file
        if isinstance(err, UserError):
            raise
        raise UserError(f"{path}: unreadable user file ({type(err).__name__})") from None
