"""A user's DeepSpeed JSON with a key DeepSpeed would ignore, through the real launcher: one `desmoe: error:`
line naming the file and the key, exit 2, no traceback, before any run directory is made."""
import json

import pytest
from jobs import ROOT, run_smoke


@pytest.mark.parametrize("extra, expect", [
    ({"gradient_cliping": 1.0}, "key 'gradient_cliping': unknown (DeepSpeed would ignore it without a word); "
                                "did you mean 'gradient_clipping'?"),
    ({"seed": 1}, "key 'seed': not supported (DeepSpeed has no seed key and would ignore it; the seed is set in "
                  "the experiment config); remove it"),
])
def test_the_launcher_refuses_a_key_deepspeed_would_ignore(tmp_path, extra, expect):
    path = tmp_path / "user.json"
    path.write_text(json.dumps({**json.loads((ROOT / "configs/zero2.json").read_text()), **extra}))
    # a run that would train (in a second) were the key not refused
    proc = run_smoke("--deepspeed", str(path), "--config", "configs/smoke.yaml", "model.hidden_size=32",
                     "model.ffn_size=32", "model.ep_size=1", "train.seq_len=32", "train.steps=1",
                     "train.eval_batches=1", "data.max_bytes=300000", f"run.dir={tmp_path / 'runs'}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert errors == [f"desmoe: error: {path}: {expect}"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
