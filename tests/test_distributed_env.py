"""Process discovery from torchrun/deepspeed or Slurm variables, in real processes."""
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from desmoe.distributed import expand_hostlist, resolve_env
from desmoe.errors import LaunchError
from jobs import clean_env

ROOT = Path(__file__).resolve().parents[1]


def test_hostlist_expansion():
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]
    # several bracket groups multiply, as `scontrol show hostnames` does; the first host was 'rack1-n[1-2]'
    assert expand_hostlist("rack[1-2]-n[1-2],a[1,2]b[3,4],m5") == [
        "rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2", "a1b3", "a1b4", "a2b3", "a2b4", "m5"]
    for bad in ("n[1-2", "n[3-1]"):
        with pytest.raises(LaunchError, match=re.escape(f"SLURM_JOB_NODELIST='{bad}'")):
            expand_hostlist(bad)
    with pytest.raises(LaunchError, match="cannot read the range"):
        expand_hostlist("n[1-x]")


def test_slurm_mapping():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "cn[12-15]", "SLURM_JOB_ID": "123456"}
    d = resolve_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (5, 8, 1, "cn12", "slurm")
    assert d.master_port == 20000 + 123456 % 20000
    assert resolve_env({**env, "MASTER_PORT": "29511"}).master_port == 29511


def test_torch_variables_win_and_partial_envs_fail():
    full = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
            "SLURM_PROCID": "0"}
    assert resolve_env(full).source == "torch"
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT missing"):
        resolve_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST"):
        resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"})
    with pytest.raises(LaunchError, match="rank 3 is not in a world of size 2"):
        resolve_env({**full, "RANK": "3"})
    with pytest.raises(LaunchError, match="RANK='x'"):
        resolve_env({**full, "RANK": "x"})
    assert resolve_env({}).source == "single"


WORKER = """
import torch
from desmoe.distributed import init_distributed
import deepspeed.comm as dist
d = init_distributed(timeout_s=60)
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"OK {d.source} rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item():.0f}", flush=True)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_variables_start_real_ranks():
    port = _free_port()
    job_id = port - 20000 if 20000 <= port < 40000 else None
    extra = {"SLURM_JOB_ID": str(job_id)} if job_id is not None else {"SLURM_JOB_ID": "7", "MASTER_PORT": str(port)}
    lines = _two_ranks(WORKER, lambda r: dict(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                              SLURM_JOB_NODELIST="localhost", **extra))
    assert lines == ["OK slurm rank=0 world=2 sum=3", "OK slurm rank=1 world=2 sum=3"]


def _two_ranks(script: str, env_of) -> list[str]:
    """Run ``script`` as 2 real processes (``env_of(rank)``: their variables); their sorted "OK" lines."""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(**env_of(r)))
             for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("OK"))


def test_incomplete_slurm_env_is_one_clear_line():
    proc = subprocess.run([sys.executable, str(ROOT / "launcher/smoke.py"), "--config", str(ROOT / "configs/smoke.yaml")],
                          capture_output=True, text=True, timeout=180,
                          env=clean_env(SLURM_PROCID="0", SLURM_NTASKS="2"), cwd=ROOT)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert len(lines) == 1 and "SLURM_LOCALID" in lines[0] and "srun" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


SHM_WORKER = """
import os, pathlib, torch
from desmoe.distributed import init_distributed
import deepspeed.comm as dist
d = init_distributed(timeout_s=60)
dist.barrier()  # both ranks past init
seen = sorted(p.name for p in pathlib.Path('/dev/shm').glob('deepspeed_allreduce_buffer_*_' + os.environ['MASTER_PORT'] + '_*'))
t = torch.full((1024,), float(d.rank + 1))
dist.inference_all_reduce(t)  # DeepSpeed's shared-memory all-reduce, through the mappings alone
print(f"OK rank={d.rank} seen={seen} sum={t[0].item():.0f}/{t[-1].item():.0f}", flush=True)
"""


def test_deepspeed_shm_segments_leave_nothing_in_dev_shm():
    """DeepSpeed's CPU comm op names a 66 MiB /dev/shm segment per rank and never unlinks it: every run
    (killed or not) left 2 x 66 MiB of RAM behind.  After init the names must be gone on every rank while
    the segments still carry DeepSpeed's shared-memory all-reduce."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    port = _free_port()
    lines = _two_ranks(SHM_WORKER, lambda r: dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    assert lines == ["OK rank=0 seen=[] sum=3/3", "OK rank=1 seen=[] sum=3/3"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
