"""`make gpu-check`'s own plumbing on CPU ranks (bench/gpu_check.py --cpu): the script a lent GPU runs first,
with a device budget of minutes for all tries, so a stage broken by a renamed config key or launcher must
be found here, not there.  Its stages launch the real launchers on 2 ranks (gloo, EP = 2); the test checks
each stage ends "ok" with its figure, and the table and gpu_check.json agree.  It runs in bf16 (``--bf16``: DeepSpeed's
bf16 engine, as on the GPU; the stages' own tests cover fp32), so the precision path the device runs is tried too.  TRGE's stage is left out:
on CPU it fetches MNIST, and the TRGE launcher has its own tests (test_trge_run.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("smoke+resume", "pretrain", "desmoe+fft")


def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--cpu", "--bf16", "--only",
                           "smoke,pretrain,desmoe", "--out", str(tmp_path / "gpu-check")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(f"\n--- {log.name} (tail) ---\n{log.read_text()[-2500:]}"
                   for log in sorted((tmp_path / "gpu-check").glob("*.log")))  # a failed stage's own words
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    rows = json.loads((tmp_path / "gpu-check" / "gpu_check.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == list(STAGES)
    for r in rows:
        assert r["status"] == "ok" and r["figure"], r
        assert f"| {r['stage']} | ok |" in proc.stdout  # the one table a device session reads
    assert "->" in rows[0]["figure"] and "test ppl" in rows[1]["figure"]  # losses, and the base's perplexity
    for run in ("smoke", "pretrain", "desmoe", "fft"):
        assert json.loads((tmp_path / "gpu-check" / run / "deepspeed.json").read_text())["bf16"]["enabled"] is True, run
