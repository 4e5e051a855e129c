import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from rankpool import RankPool  # noqa: E402
from datafix import tiny_data  # noqa: E402,F401  (session-scoped tiny data build)

_pool: RankPool | None = None


@pytest.fixture
def ranks():
    """A pool of 2 real gloo ranks, shared across tests and restarted if a test broke it."""
    global _pool
    if _pool is None or not _pool.healthy:
        if _pool is not None:
            _pool.close()
        _pool = RankPool(2)
    yield _pool


def pytest_sessionfinish(session, exitstatus):
    if _pool is not None:
        _pool.close()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """One real local Slurm cluster (2 emulated nodes) for every Slurm test of the session."""
    from slurmcluster import LocalSlurm, SlurmUnavailable

    try:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as why:
        pytest.skip(f"local Slurm cluster not possible here: {why}")
    yield cluster
    cluster.stop()
