"""Starting real desmoe processes from tests: a clean environment and the smoke launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher or Slurm variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def smoke_command(*args: str, nproc: int = 1, port: Optional[int] = None) -> list[str]:
    """The smoke launcher, as one process or under torchrun with ``nproc`` ranks."""
    launcher = [str(ROOT / "launcher/smoke.py"), *args]
    if nproc == 1:
        return [sys.executable, *launcher]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(port), *launcher]


def run_smoke(*args: str, nproc: int = 1, port: Optional[int] = None, timeout: float = 600,
              env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run(smoke_command(*args, nproc=nproc, port=port), capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env(), cwd=ROOT)
