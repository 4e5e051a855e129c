"""``python -m desmoe.inspect_run`` on a run stopped past its last checkpoint (2 real ranks, the smoke LM): the
steps logged after it are redone by a resume, so the report must say which they are; the metrics it shows are
theirs.  The same folder moved elsewhere (a path with a space) reads the same."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_run_faults import run_case

ROOT = Path(__file__).resolve().parents[1]


def _inspect(run: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "desmoe.inspect_run", str(run), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_steps_logged_after_the_checkpoint_are_named(ranks, tmp_path):
    assert ranks.run(run_case, str(tmp_path), 6, "crash", 5) == ["crash", "crash"]  # checkpoint at 4, 5 logged
    moved = tmp_path / "moved run"
    shutil.move(str(tmp_path / "r"), str(moved))
    info = json.loads(_inspect(moved, "--json").stdout)
    assert info["checkpoint_step"] == 4 and info["last_logged_step"] == 5 and info["redone_on_resume"] == [5, 5]
    assert set(info["integrity"].values()) == {"ok (15 files, sha256 verified)"}, info["integrity"]
    proc = _inspect(moved)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note")]
    assert notes == ["note              step 5 logged after checkpoint step00000004: a resume redoes them "
                     "(the metrics below may be theirs)"], proc.stdout
    shutil.move(str(moved), str(tmp_path / "r"))
    assert ranks.run(run_case, str(tmp_path), 6) == ["ok", "ok"]
    info = json.loads(_inspect(tmp_path / "r", "--json", "--no-verify").stdout)
    assert info["checkpoint_step"] == 6 and info["redone_on_resume"] is None


def test_steps_logged_before_any_checkpoint_are_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 3.0}) + "\n" for s in (1, 2, 3)))
    proc = _inspect(tmp_path)
    assert proc.returncode == 0 and "note              steps 1..3 logged with no checkpoint: a resume redoes them" \
        in proc.stdout, proc.stdout + proc.stderr
