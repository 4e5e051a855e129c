"""Launch environments users meet by accident: a rendezvous port already taken, and a launcher started by
an sbatch script itself (SLURM_PROCID=0 and the job's task count, but no srun step)."""
import socket
import subprocess
import sys

import pytest

from desmoe.distributed import resolve_env
from desmoe.errors import LaunchError
from jobs import ROOT, clean_env

BATCH = {"ENVIRONMENT": "BATCH", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
         "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "42"}


def test_batch_script_of_a_multi_task_job_is_refused_not_left_waiting():
    with pytest.raises(LaunchError, match=r"^SLURM_NTASKS=4 but this process is job 42's batch script, not a task "
                                          r"of an srun step: start one process per task with srun"):
        resolve_env(BATCH)
    # srun's tasks inherit ENVIRONMENT=BATCH and carry a step id; a one-task batch script is a world of one
    assert resolve_env({**BATCH, "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}).rank == 3
    assert resolve_env({**BATCH, "SLURM_NTASKS": "1"}).world_size == 1


def test_master_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, str(ROOT / "launcher/smoke.py"), "--config", str(ROOT / "configs/smoke.yaml"),
             "model.ep_size=1", f"run.dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
            env=clean_env(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert len(lines) == 1 and f"MASTER_PORT={port}: in use" in lines[0] and "free port" in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())


def test_an_srun_step_on_some_of_the_jobs_nodes_meets_on_its_own_first_node():
    """`srun -w n2 -n2` inside a job on n[1-2]: rank 0 runs on n2, so the master is n2, not the job's first
    node; a second step of the job gets its own port (two steps at once would meet on one)."""
    step = {**BATCH, "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n2"}
    first = resolve_env(step)
    assert first.master_addr == "n2"
    assert resolve_env({k: v for k, v in step.items() if k != "SLURM_STEP_NODELIST"}).master_addr == "n1"
    assert resolve_env({**step, "SLURM_STEP_ID": "1"}).master_port != first.master_port
