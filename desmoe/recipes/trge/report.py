"""Collect the results.json of several runs into one table (markdown + CSV).

    python -m desmoe.recipes.trge.report runs/suite            # every run folder below
"""
from __future__ import annotations

import json
from pathlib import Path

from desmoe.checkpoint import write_text_atomic
from desmoe.errors import UserError, run_cli


def rows(root: Path) -> list[dict]:
    out = []
    for path in sorted(root.glob("*/results.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: not a readable results.json ({err}); re-run or delete that run") from None
        if not isinstance(r, dict) or "avg" not in r:
            continue
        ident = r["identifier"] if r["method"] in ("trge", "shared_pool") else "-"
        reading = r["reading"] if r["method"] == "trge" else "-"  # only trge's predict reads inter.reading
        # only trge fuses with the frozen model (the config refuses fusion.* for the baselines, whose
        # results.json still carries the default schedule)
        fusion = r["fusion"] if r["method"] == "trge" else "-"
        base = {"run": path.parent.name, "method": r["method"], "identifier": ident, "reading": reading,
                "fusion": fusion, "trainable_per_task": r["trainable_params_per_task"]}
        last_id = r["id_rows"][-1][: len(r["tasks"])] if r["method"] in ("trge", "shared_pool") else []
        out.append({**base, "transfer": r["transfer"], "avg": r["avg"], "last": r["last"],
                    "id_acc_last": round(sum(last_id) / len(last_id), 1) if last_id else None,
                    "control_last": round(r["control_rows"][-1][0], 1) if r["control_rows"][-1] else None})
        for v, m in r.get("variants", {}).items():
            if "avg" not in m:  # added on resume: rows for the later tasks only, no metrics
                continue
            atoms = v.split("+")  # a combined variant (oracle+no_fusion) changes each column its atoms name
            out.append({**base, "run": f"{path.parent.name} [{v}]",
                        "identifier": "oracle" if "oracle" in atoms else ident,
                        "reading": "own" if "no_inter" in atoms else reading,
                        "fusion": "frozen" if "no_fusion" in atoms else fusion,
                        "transfer": m["transfer"], "avg": m["avg"], "last": m["last"], "id_acc_last": None,
                        "control_last": None})
    return out


COLUMNS = ["run", "method", "identifier", "reading", "fusion", "transfer", "avg", "last", "id_acc_last",
           "control_last", "trainable_per_task"]


@run_cli
def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m desmoe.recipes.trge.report",
                                     description="TRGE runs' table (table.md, table.csv) in RUNS_FOLDER")
    parser.add_argument("runs_folder", metavar="RUNS_FOLDER", help="a folder holding run folders")
    root = Path(parser.parse_args().runs_folder)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (expected a folder holding run folders)")
    table = rows(root)
    if not table:
        raise UserError(f"{root}: no finished runs (no */results.json with metrics)")
    fmt = lambda v: "-" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))  # noqa: E731
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in table]
    csv = [",".join(COLUMNS)] + [",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) for r in table]
    write_text_atomic(root / "table.md", "\n".join(md) + "\n")
    write_text_atomic(root / "table.csv", "\n".join(csv) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
