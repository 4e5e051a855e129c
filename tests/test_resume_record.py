"""The settings a resume is checked against are those its checkpoint was written with (desmoe/checkpoint.py
``record_path``), not the run directory's config.yaml/deepspeed.json, which every start rewrites: a resume at
another world size (2 ranks -> 1, elastic) SIGKILLed before its first save left a deepspeed.json saying 1 rank
beside a checkpoint of 2, and resuming that checkpoint with its own 2 ranks was refused ("expected the optimizer
files of 1 ranks (deepspeed.json's world_size), found 2")."""
import signal
import socket
import subprocess
import time

from jobs import ROOT, clean_env, run_smoke, smoke_command

ARGS = ["--config", str(ROOT / "configs/smoke.yaml"), "model.hidden_size=32", "model.ffn_size=32",
        "model.num_experts=4", "train.seq_len=32", "train.micro_batch=4", "train.log_every=1",
        "train.eval_every=1000", "train.eval_batches=1", "data.max_bytes=300000", "run.name=e"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_elastic_resume_leaves_the_checkpoint_resumable_with_its_own_ranks(tmp_path):
    args, run = [*ARGS, f"run.dir={tmp_path}"], tmp_path / "e"
    first = run_smoke(*args, "train.steps=2", "model.ep_size=2", nproc=2, port=_port())
    assert first.returncode == 0, first.stderr[-3000:]
    # 1 rank x grad_accum 2 (the same global batch): killed once it has loaded the checkpoint and rewritten the
    # run's records (environment.jsonl's second line comes after them), long before its first save
    elastic = subprocess.Popen(smoke_command(*args, "train.steps=1000", "model.ep_size=1", "train.grad_accum=2"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(), cwd=ROOT)
    log, deadline = run / "environment.jsonl", time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert elastic.poll() is None and time.monotonic() < deadline, "the elastic resume did not start"
        time.sleep(0.05)
    elastic.send_signal(signal.SIGKILL)
    elastic.wait()
    assert (run / "checkpoints/latest").read_text() == "step00000002" and '"world_size": 1' in \
        (run / "deepspeed.json").read_text(), "the kill came too late to leave the records of the other layout"
    resumed = run_smoke(*args, "train.steps=3", "model.ep_size=2", nproc=2, port=_port())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "checkpoints/latest").read_text() == "step00000003"
