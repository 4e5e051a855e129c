"""DES-MoE and its baselines on users' own HF MoE folders, through the real launcher on 2 ranks: settings
the family tests (tests/test_hf_methods.py) do not reach."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ["data.source=stdlib", "data.domains=[email, xml]", "data.general=[json]", "data.max_bytes_per_domain=40000",
       "train.steps=10", "train.micro_batch=2", "train.seq_len=16", "train.log_every=5", "train.eval_every=100",
       "train.eval_batches=1", "train.save_every=100", "train.lr=0.01", "desmoe.dges.update_every=2",
       "desmoe.baseline.esft_profile_tokens=64", "evaluation.downstream=false"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """launcher/desmoe.py under torchrun, 2 CPU ranks, configs/zero2.json."""
    from jobs import clean_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(ROOT / "launcher/desmoe.py"), "--deepspeed", str(ROOT / "configs/zero2.json"), *RUN, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=clean_env(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1"))


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = sorted({line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")})
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    # torchrun prints its own traceback (ChildFailedError) for a rank that exits 2; the ranks print none
    assert "exitcode: 2" in proc.stderr and "]: Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_a_base_with_fewer_token_ids_than_the_data_is_one_line(tmp_path):
    """tests/hf_tiny.py's checkpoints have 96 token ids, the stdlib data 256 (bytes): the first forward used to
    stop every rank with "IndexError: index out of range in self"."""
    from hf_tiny import save_tiny

    base = save_tiny("olmoe", tmp_path / "olmoe96")
    error = one_error_line(launch(f"base.hf={base}", "model.ep_size=2", f"run.dir={tmp_path}", "run.name=r"))
    assert f"base.hf={base}: key 'vocab_size': expected at least the 256 token ids of the data " \
           f"(data.source=stdlib), got 96" in error, error
    assert not (tmp_path / "r" / "checkpoints").exists()
