"""Inspect a run directory: last checkpoint, step, latest metrics.

    python -m desmoe.inspect_run runs/smoke [--json]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from desmoe import checkpoint, integrity
from desmoe.errors import UserError, run_cli
from desmoe.monitor import read_metrics
from desmoe.training.runlock import LOCK

RUN_FILES = (LOCK, "config.yaml", "metrics.jsonl", "checkpoints", "tensorboard")


def verify_tag(tag_dir: Path) -> str:
    """'ok (N files)', 'no manifest' or the one-line reason the tag's files differ from its manifest."""
    try:
        if not integrity.verify(tag_dir, "checkpoint", hashes=True):
            return "no manifest (written before manifests existed)"
    except UserError as err:
        return f"FAILED: {err}"
    return f"ok ({len(integrity.read_manifest(tag_dir, 'checkpoint')['files'])} files, sha256 verified)"


def describe(run_dir: Path, verify: bool = True) -> dict:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, expected a run directory")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    # what a run writes first (the job's lock, then its config): without any, all below would read '-' as if a
    # run had just started, also for run.dir itself (the folder of every run) or a folder desmoe never wrote
    if not any((run_dir / name).exists() for name in RUN_FILES):
        runs = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and any((p / n).exists() for n in RUN_FILES))
        hint = f"; runs in it: {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}" if runs else ""
        raise UserError(f"{run_dir}: not a run directory (expected one of {', '.join(RUN_FILES)}){hint}")
    ckpt_dir = run_dir / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []
    # a metrics row that is not an object, or has no step (a hand-edited or foreign file), is not shown
    rows = [r for r in read_metrics(run_dir) if isinstance(r, dict) and isinstance(r.get("step"), int)]
    latest: dict[str, float] = {}
    for row in rows:
        latest.update({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))})
    step = re.search(r"step(\d+)$", tag or "")  # 'latest' may name a tag desmoe did not write (global_step10)
    saved = int(step.group(1)) if step else (0 if tag is None else None)  # no checkpoint: a resume starts at 0
    lost = sorted({r["step"] for r in rows if saved is not None and r["step"] > saved})
    phase = next((latest[k] for k in ("train/phase", "train/task") if k in latest), None)
    return {
        "run": str(run_dir),
        "latest_checkpoint": tag,
        "checkpoint_step": int(step.group(1)) if step else None,
        # rows of steps the checkpoint does not hold: a resume drops and redoes them (the trainer's truncation)
        "redone_on_resume": [lost[0], lost[-1]] if lost else None,
        "checkpoints": tags,
        "last_logged_step": rows[-1]["step"] if rows else None,
        "phase_or_task": phase,
        "latest_metrics": latest,
        "interrupted_save": any(p.is_dir() for p in (ckpt_dir / checkpoint.STAGING).glob("step*")),
        "integrity": {t: verify_tag(ckpt_dir / t) for t in sorted(set(tags) | {tag} - {None, ""})} if verify else {},
    }


@run_cli
def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-verify", action="store_true", help="skip hashing the checkpoints' files")
    args = parser.parse_args()
    info = describe(args.run_dir, verify=not args.no_verify)
    failed = any(v.startswith("FAILED") for v in info["integrity"].values())
    if args.json:
        print(json.dumps(info, indent=2))
        raise SystemExit(1 if failed else 0)
    print(f"run               {info['run']}")
    print(f"latest checkpoint {info['latest_checkpoint'] or '-'}  ({len(info['checkpoints'])} kept)")
    print(f"last logged step  {info['last_logged_step'] if info['last_logged_step'] is not None else '-'}")
    if info["phase_or_task"] is not None:
        print(f"phase / task      {info['phase_or_task']:g}")
    if info["redone_on_resume"]:
        first, last = info["redone_on_resume"]
        steps = f"step {first}" if first == last else f"steps {first}..{last}"
        since = f"after checkpoint {info['latest_checkpoint']}" if info["latest_checkpoint"] else "with no checkpoint"
        print(f"note              {steps} logged {since}: a resume redoes them (the metrics below may be theirs)")
    if info["interrupted_save"]:
        print("note              an interrupted save is left in checkpoints/.staging (ignored on resume)")
    for tag, status in info["integrity"].items():
        print(f"checkpoint {tag}  {status}")
    for key, value in sorted(info["latest_metrics"].items()):
        print(f"  {key:<24} {value:.6g}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
