"""Intra-op threads per CPU rank under Slurm: the node's cores are shared by the ranks of this node.
SLURM_NTASKS_PER_NODE exists only with --ntasks-per-node; a job that asked --ntasks (or got an uneven
layout such as "4,2") gave every rank all the node's cores, oversubscribing them (3-5x slower, measured)."""
import os
import subprocess
import sys

import pytest

from desmoe.distributed import _per_node_counts
from jobs import ROOT, clean_env

PROBE = "import torch; from desmoe.distributed import prepare_process; prepare_process(); print(torch.get_num_threads())"


def _threads(**slurm: str) -> int:
    env = clean_env(DS_ACCELERATOR="cpu", **slurm)
    env.pop("OMP_NUM_THREADS")  # the rule applies only where the user did not choose
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_slurm_per_node_counts_are_read():
    assert _per_node_counts("2(x3),1") == [2, 2, 2, 1]
    assert _per_node_counts("4,2") == [4, 2]
    assert _per_node_counts("8") == [8]
    assert _per_node_counts("") == [] and _per_node_counts("2(x") == []


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: one thread whatever the layout")
def test_slurm_ranks_of_a_node_share_its_cores():
    cores = os.cpu_count()
    # --ntasks=4 over two nodes, this process on the second node with 2 of them; the step's layout wins
    assert _threads(SLURM_TASKS_PER_NODE="3,1", SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_NODEID="1") == cores // 2
    assert _threads(SLURM_TASKS_PER_NODE="1,2", SLURM_NODEID="1") == cores // 2
    assert _threads(SLURM_TASKS_PER_NODE="1,2", SLURM_NODEID="0") == cores
