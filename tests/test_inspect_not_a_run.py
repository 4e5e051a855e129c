"""``python -m desmoe.inspect_run`` on a folder that is not one run: run.dir itself (the folder of every run, a
usual slip) or a folder desmoe never wrote.  It must say so in one line, naming the runs inside where there
are some, not print an empty report ('-' everywhere, exit 0) that reads like a run that has just started."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _inspect(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "desmoe.inspect_run", str(run), "--no-verify"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_the_folder_of_every_run_is_refused_naming_its_runs(tmp_path):
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "config.yaml").write_text("run:\n  name: smoke\n")
    (tmp_path / "notes").mkdir()
    proc = _inspect(tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a run directory" in lines[0] and "runs in it: smoke" in lines[0], lines
    assert str(tmp_path) in lines[0] and "notes" not in lines[0], lines


def test_an_empty_folder_is_refused_and_a_just_started_run_is_not(tmp_path):
    proc = _inspect(tmp_path)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr and "runs in it" not in proc.stderr
    (tmp_path / ".lock").write_text("{}")  # what a job writes first, before its model is even built
    proc = _inspect(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "latest checkpoint -" in proc.stdout and "last logged step  -" in proc.stdout, proc.stdout
