"""On a real local Slurm (2 emulated nodes x 2 tasks): ranks, preemption + requeue, dead ranks."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Small enough for 4 CPU ranks on 2 cores; EP=2 inside a world of 4 (so EDP=2 too).
SMOKE_ARGS = ["model.hidden_size=32", "model.ffn_size=32", "model.num_experts=4", "train.seq_len=32",
              "train.micro_batch=4", "train.log_every=1", "train.eval_every=6", "train.eval_batches=1",
              "train.save_every=6", "data.max_bytes=300000"]


def job_env(**extra):
    # The emulated nodes n1/n2 are both this machine and their names do not resolve,
    # so the rendezvous address is given (a real cluster uses the first host's name).
    return {"MASTER_ADDR": "127.0.0.1", "DESMOE_CPU": "1", "DESMOE_PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT), **extra}


CPU_JOB = ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00")


def test_slurm_variables_make_a_four_rank_world(slurm, tmp_path):
    script = tmp_path / "ranks.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=2 --cpus-per-task=1 --time=00:05:00 --output={tmp_path}/%j.out
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
srun --kill-on-bad-exit=1 {sys.executable} -c "
import torch, deepspeed.comm as dist
from desmoe.distributed import init_distributed
d = init_distributed(timeout_s=60)
t = torch.tensor([float(dist.get_rank() + 1)]); dist.all_reduce(t)
print('rank', dist.get_rank(), 'of', dist.get_world_size(), 'local', d.local_rank, 'sum', int(t.item()), d.source)
"
""")
    result = slurm.wait(slurm.submit(script, env=job_env()), timeout=300)
    assert result.state == "COMPLETED", result.output
    lines = sorted(line for line in result.output.splitlines() if line.startswith("rank"))
    assert lines == [f"rank {r} of 4 local {r % 2} sum 10 slurm" for r in range(4)]


def read_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r], \
           [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]


def submit_smoke(slurm, tmp_path, name, steps):
    return slurm.submit(ROOT / "slurm/smoke.sh", *SMOKE_ARGS, f"train.steps={steps}", f"run.dir={tmp_path}",
                        sbatch_args=CPU_JOB + (f"--output={tmp_path}/{name}-%j.out",),
                        env=job_env(DESMOE_RUN_NAME=name, DESMOE_LOG_DIR=str(tmp_path / "logs")), cwd=ROOT)


def wait_for_step(run_dir, step, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                  if line.strip()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} never reached step {step}")


def test_preempted_job_requeues_and_matches_uninterrupted_run(slurm, tmp_path):
    steps = 14
    ref = slurm.wait(submit_smoke(slurm, tmp_path, "ref", steps), timeout=600)
    assert ref.state == "COMPLETED" and ref.restarts == 0, ref.output

    job = submit_smoke(slurm, tmp_path, "pre", steps)
    wait_for_step(tmp_path / "pre", 8)  # past the step-6 checkpoint, so the signal path saves its own
    slurm.cmd(["scancel", "--signal=USR1", job])
    result = slurm.wait(job, timeout=600)
    assert result.state == "COMPLETED", result.output
    assert result.restarts == 1, f"expected one requeue, got {result.restarts}:\n{result.output}"
    assert "checkpoint saved on preemption at step" in result.output

    ref_train, ref_val = read_losses(tmp_path / "ref")
    pre_train, pre_val = read_losses(tmp_path / "pre")
    assert [s for s, _ in ref_train] == list(range(1, steps + 1))
    assert pre_train == ref_train, "resumed loss curve differs from the uninterrupted one"
    assert pre_val == ref_val
    saved = sorted(p.name for p in (tmp_path / "pre" / "checkpoints").glob("step*"))
    assert len(saved) >= 3, saved  # step 6, the preemption step, and the final one


def test_killed_rank_fails_the_job_through_srun(slurm, tmp_path):
    job = submit_smoke(slurm, tmp_path, "kill", 100000)
    wait_for_step(tmp_path / "kill", 2)
    pids = subprocess.run(["pgrep", "-f", f"run.dir={tmp_path}"], capture_output=True, text=True).stdout.split()
    ranks = []
    for pid in pids:  # the Python ranks themselves, not srun or the step daemons
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if len(argv) > 1 and argv[1].endswith(b"launcher/smoke.py") and b"python" in argv[0]:
            ranks.append(int(pid))
    assert len(ranks) == 4, pids
    os.kill(ranks[-1], signal.SIGKILL)
    try:
        result = slurm.wait(job, timeout=300)
    finally:
        slurm.cmd(["scancel", job], check=False)
    assert result.state == "FAILED", result.output
    # The step was ended by srun --kill-on-bad-exit (which gives the others --wait=60 s at
    # most), not by a collective timeout in the surviving ranks.
    assert re.search(r"task \d+: Killed", result.output), result.output
    assert "_step_signal: Terminating StepId" in result.output, result.output
