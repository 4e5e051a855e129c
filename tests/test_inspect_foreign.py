"""``python -m desmoe.inspect_run`` on run directories desmoe did not quite write: a checkpoint folder with
DeepSpeed's own tag name, a metrics file holding a row that is not an object or has no step.  It shows
what it can instead of a traceback (int('al_step10'), 'list' object has no attribute 'items')."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _inspect(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "desmoe.inspect_run", str(run), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_foreign_tag_and_odd_metrics_rows_are_shown_not_a_traceback(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "global_step10").mkdir(parents=True)
    (run / "checkpoints" / "global_step10" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (run / "checkpoints" / "latest").write_text("global_step10")
    (run / "checkpoints" / "step00000004.tar").write_bytes(b"an archive, not a tag")
    rows = [{"step": 2, "train/loss": 3.5}, [1, 2], {"note": "by hand"}, {"step": 4, "train/loss": 3.0, "tag": "a"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _inspect(run)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["latest_checkpoint"] == "global_step10" and info["checkpoint_step"] == 10
    assert info["checkpoints"] == [] and info["last_logged_step"] == 4
    assert info["latest_metrics"] == {"train/loss": 3.0}
    assert info["integrity"] == {"global_step10": "no manifest (written before manifests existed)"}
