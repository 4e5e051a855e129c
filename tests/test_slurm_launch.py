"""Slurm launches that go wrong, on the real local cluster: each must end the job with one line in the job's
own output (not only in a per-rank log, not a hang)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=00:05:00")


def job_env(tmp_path, **extra):
    # n1/n2 are this machine and their names do not resolve: the rendezvous address is given
    return {"MASTER_ADDR": "127.0.0.1", "DESMOE_CPU": "1", "DESMOE_PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
            "DESMOE_LOG_DIR": str(tmp_path / "logs"), **extra}


def desmoe_lines(output):
    return [line for line in output.splitlines() if "desmoe: error:" in line]


def test_config_error_is_one_line_in_the_job_output(slurm, tmp_path):
    job = slurm.submit(ROOT / "slurm/smoke.sh", "train.stepz=3", f"run.dir={tmp_path}",
                       sbatch_args=("--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path}/job-%j.out") + CPU_JOB,
                       env=job_env(tmp_path), cwd=ROOT)
    result = slurm.wait(job, timeout=300)
    assert result.state == "FAILED", result.output
    lines = desmoe_lines(result.output)
    assert len(lines) == 1 and "unknown key 'train.stepz'" in lines[0], result.output
    assert lines[0].startswith(f"job {job}: rank"), lines
    assert f"run {tmp_path}/smoke-{job} " in result.output  # where the run goes, as the override says
    assert not (tmp_path / f"smoke-{job}").exists()


def test_launcher_started_by_the_batch_script_itself_fails_at_once(slurm, tmp_path):
    """`python launcher/smoke.py` without srun in a 2-task job: the batch script is 'rank 0 of 2' and would
    wait for a rank 1 nobody starts until the rendezvous times out."""
    script = tmp_path / "direct.sh"
    script.write_text(f"""#!/bin/bash
export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 OMP_NUM_THREADS=1
timeout 240 {sys.executable} {ROOT}/launcher/smoke.py --config {ROOT}/configs/smoke.yaml run.dir={tmp_path}
echo "exit $?"
""")
    job = slurm.submit(script, sbatch_args=("--nodes=1", "--ntasks-per-node=2", f"--output={tmp_path}/job-%j.out")
                       + CPU_JOB, env=job_env(tmp_path), cwd=tmp_path)
    result = slurm.wait(job, timeout=300)
    lines = desmoe_lines(result.output)
    assert len(lines) == 1 and "SLURM_NTASKS=2" in lines[0] and "srun" in lines[0], result.output
    assert "exit 2" in result.output, result.output


def test_script_submitted_from_another_directory_says_so(slurm, tmp_path):
    (tmp_path / "logs").mkdir()  # where the #SBATCH --output line puts the job log, relative to the submit dir
    job = slurm.submit(ROOT / "slurm/desmoe_6dom.sh", sbatch_args=("--nodes=1", "--ntasks-per-node=1") + CPU_JOB,
                       env=job_env(tmp_path), cwd=tmp_path)
    result = slurm.wait(job, timeout=120)
    assert result.state == "FAILED", result.output
    assert result.output.strip().splitlines() == [
        f"desmoe: error: submitted from {tmp_path}, which is not the repository root (no slurm/launch.sh): "
        f"cd to the repository, then sbatch slurm/desmoe_6dom.sh"], result.output


def test_script_run_with_bash_instead_of_sbatch_says_so(tmp_path):
    """`bash slurm/desmoe_6dom.sh` outside any allocation stopped on bash's 'SLURM_JOB_ID: unbound variable'."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["DESMOE_LOG_DIR"] = str(tmp_path / "logs")
    for script in ("slurm/desmoe_6dom.sh", "slurm/smoke.sh"):
        proc = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert (proc.stdout + proc.stderr).strip().splitlines() == [
            f"desmoe: error: SLURM_JOB_ID is not set: {script} is a Slurm batch script; submit it with sbatch "
            f"{script} (or run it inside an salloc allocation); without Slurm, start the launcher with torchrun "
            f"or deepspeed"]
    assert not (tmp_path / "logs").exists()


def test_job_log_names_the_run_an_override_chose(slurm, tmp_path):
    """`sbatch slurm/smoke.sh run.name=mine`: the run went to <run.dir>/mine (the user's override comes last)
    but the job log pointed TensorBoard at <run.dir>/smoke-<job id>."""
    job = slurm.submit(ROOT / "slurm/smoke.sh", "train.stepz=3", f"run.dir={tmp_path}", "--run.name", "mine",
                       sbatch_args=("--nodes=1", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out") + CPU_JOB,
                       env=job_env(tmp_path), cwd=ROOT)
    result = slurm.wait(job, timeout=300)
    assert f"run {tmp_path}/mine (tensorboard --logdir {tmp_path}/mine/tensorboard)" in result.output, result.output
