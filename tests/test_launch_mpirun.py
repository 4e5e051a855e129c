"""Open MPI's mpirun: each process knows its rank only from OMPI_COMM_WORLD_*.  Every process used to take
itself for a world of one and train alone; now they meet, or are refused in one line."""
import socket
import subprocess
import sys

import pytest

from desmoe.distributed import resolve_env
from desmoe.errors import LaunchError
from jobs import ROOT, clean_env

WORKER = """
import torch
from desmoe.distributed import init_distributed
import deepspeed.comm as dist
d = init_distributed(timeout_s=60)
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"OK {d.source} rank={dist.get_rank()} local={d.local_rank} world={dist.get_world_size()} sum={t.item():.0f}",
      flush=True)
"""


def _ompi(rank: int, world: int = 2, local_size: int = 2) -> dict:
    """The variables mpirun gives a process (Open MPI 4 and 5 alike)."""
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(world),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % local_size), "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size)}


def test_mpirun_variables_map_or_are_refused():
    d = resolve_env({**_ompi(3, world=4, local_size=2), "MASTER_ADDR": "n1", "MASTER_PORT": "29501"})
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.source) == (3, 4, 1, "n1", 29501,
                                                                                           "mpirun")
    # all ranks on one node: rank 0 is on this host, only the port must be agreed on
    assert resolve_env({**_ompi(1), "MASTER_PORT": "29502"}).master_addr == "127.0.0.1"
    with pytest.raises(LaunchError, match=r"^OMPI_COMM_WORLD_SIZE=2 \(mpirun\) but MASTER_PORT unset"):
        resolve_env(_ompi(1))
    with pytest.raises(LaunchError, match=r"^OMPI_COMM_WORLD_SIZE=4 \(mpirun\) but MASTER_ADDR and MASTER_PORT unset"):
        resolve_env(_ompi(0, world=4, local_size=2))
    assert resolve_env(_ompi(0, world=1, local_size=1)).world_size == 1
    # torchrun's variables, when present, still win
    assert resolve_env({**_ompi(1), "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h",
                        "MASTER_PORT": "1"}).source == "torch"


def test_mpirun_variables_start_real_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=clean_env(DS_ACCELERATOR="cpu", MASTER_PORT=str(port),
                                                                 **_ompi(r)))
             for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    lines = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("OK"))
    assert lines == ["OK mpirun rank=0 local=0 world=2 sum=3", "OK mpirun rank=1 local=1 world=2 sum=3"]
