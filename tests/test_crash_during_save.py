"""A crash at any point of a save leaves the previous checkpoint loadable."""
import json
import shutil
import signal
import subprocess
import time

from jobs import ROOT, clean_env, run_smoke, smoke_command
ARGS = ["model.hidden_size=32", "model.ffn_size=32", "model.num_experts=4", "model.ep_size=1", "train.seq_len=32",
        "train.micro_batch=4", "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
        "train.save_every=1", "data.max_bytes=300000"]


def run_job(run_dir, steps, wait=True):
    args = ("--config", str(ROOT / "configs/smoke.yaml"), *ARGS, f"train.steps={steps}", f"run.dir={run_dir}",
            "run.name=c")
    if wait:
        return run_smoke(*args)
    return subprocess.Popen(smoke_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=clean_env(), cwd=ROOT)


def test_sigkill_during_saves_then_resume(tmp_path):
    ckpt = tmp_path / "c" / "checkpoints"
    proc = run_job(tmp_path, 10_000, wait=False)
    deadline = time.monotonic() + 300
    while not (ckpt / "latest").exists():  # a complete checkpoint exists...
        assert proc.poll() is None and time.monotonic() < deadline, "job died before its first checkpoint"
        time.sleep(0.05)
    time.sleep(1.3)  # ...then kill at an arbitrary moment: with save_every=1, most likely inside a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = (ckpt / "latest").read_text()
    assert (ckpt / latest).is_dir()
    done = int(latest[4:])
    resumed = run_job(tmp_path, done + 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (ckpt / "latest").read_text() == f"step{done + 2:08d}"


def test_every_crash_state_resumes_from_a_complete_checkpoint(tmp_path):
    """The states a crash can leave, made exactly: (a) a half-written tag in staging,
    (b) a finished tag renamed into place but `latest` not yet updated, (c) a stray
    temp file of the pointer.  The next run resumes from `latest` in each case."""
    first = run_job(tmp_path, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "c" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    # (a) half-written staging copy of a later step: some files, one truncated
    half = ckpt / ".staging" / "step00000003"
    shutil.copytree(ckpt / "step00000002", half)
    victim = sorted(half.glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    # (b) a complete tag that `latest` does not point to yet: must be ignored, not loaded
    shutil.copytree(ckpt / "step00000002", ckpt / "step00000009")
    # (c) the pointer's temp file from an interrupted rewrite
    (ckpt / ".latest.tmp12345").write_text("step000")
    resumed = run_job(tmp_path, 4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (ckpt / "latest").read_text() == "step00000004"
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
