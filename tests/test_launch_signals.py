"""Slurm's warning signal (SIGUSR1, #SBATCH --signal=USR1@N) at an odd moment: during set-up, before the
training loop.  Its default action kills the process, which failed the job instead of requeueing it."""
import signal
import subprocess
import time

from jobs import ROOT, clean_env, smoke_command

TINY = ["data.max_bytes=100000", "model.hidden_size=32", "model.ffn_size=32", "train.seq_len=32", "model.ep_size=1",
        "train.log_every=1", "train.eval_every=50", "train.eval_batches=1", "train.steps=4", "run.name=s"]


def test_sigusr1_during_setup_saves_at_the_first_step_and_resumes(tmp_path):
    args = ["--config", str(ROOT / "configs/smoke.yaml"), *TINY, f"run.dir={tmp_path}"]
    proc = subprocess.Popen(smoke_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(DS_ACCELERATOR="cpu"), cwd=ROOT)
    time.sleep(1.5)  # imports and set-up take several seconds more: no loop runs yet
    assert proc.poll() is None
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, f"rc={proc.returncode}\n{err[-3000:]}"  # EX_TEMPFAIL outside our Slurm scripts
    assert "preempted at step 1 (SIGUSR1): checkpoint saved" in out, out[-2000:]
    assert (tmp_path / "s/checkpoints/latest").read_text() == "step00000001"
    again = subprocess.run(smoke_command(*args), capture_output=True, text=True, timeout=300,
                           env=clean_env(DS_ACCELERATOR="cpu"), cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "s/checkpoints/latest").read_text() == "step00000004"
