"""DS_ACCELERATOR=cuda where torch sees no CUDA device (a job that got no GPU) ran silently on CPU and gloo:
now it is refused in one line."""
import subprocess
import sys

import pytest
import torch

from jobs import ROOT, clean_env


def test_cuda_accelerator_without_a_cuda_device_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: DS_ACCELERATOR=cuda is honoured")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launcher/smoke.py"), "--config", str(ROOT / "configs/smoke.yaml"),
         "model.ep_size=1", f"run.dir={tmp_path}"], capture_output=True, text=True, timeout=180, cwd=ROOT,
        env=clean_env(DS_ACCELERATOR="cuda"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert len(lines) == 1 and "DS_ACCELERATOR=cuda but torch sees no CUDA device" in lines[0], proc.stderr[-3000:]
    assert not any(tmp_path.iterdir())
