"""A local rank outside the world (LOCAL_RANK=-1, DeepSpeed's 'no launcher' default exported by a wrapper,
or a node-local index that cannot exist) is refused in one line: it chose the GPU modulo the visible count
(-1 -> the last GPU) and which rank of a node fills its caches first."""
import pytest

from desmoe.distributed import resolve_env
from desmoe.errors import LaunchError

TORCH = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "5"}


@pytest.mark.parametrize("env, source", [({**TORCH, "LOCAL_RANK": "-1"}, "torch"),
                                         ({**TORCH, "LOCAL_RANK": "2"}, "torch"),
                                         ({**SLURM, "SLURM_LOCALID": "3"}, "slurm")])
def test_local_rank_outside_the_world_is_refused(env, source):
    with pytest.raises(LaunchError, match=rf"^local rank -?\d+ \(from {source} variables\): expected 0\.\.1"):
        resolve_env(env)


def test_local_ranks_of_a_world_still_resolve():
    assert resolve_env({**TORCH, "LOCAL_RANK": "1"}).local_rank == 1
    assert resolve_env({**TORCH, "LOCAL_RANK": "0"}).local_rank == 0  # rank 1 on a second node
    assert resolve_env({**SLURM, "SLURM_LOCALID": "0"}).local_rank == 0
