"""A finished rank ends without the C/C++ teardown that follows Python's exit handlers.  That teardown
intermittently aborted ranks whose work was done and written ("terminate called without an active exception", no
Python frame; docs/reliability.md), and torchrun or Slurm then marked the finished job failed.  Stood in for here
by a real C-level exit handler that aborts: the entry point's exit code, its printed output and Python's own exit
handlers must all survive it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit, ctypes, os, sys
sys.path.insert(0, {root!r})
from desmoe.errors import UserError, run_cli

@run_cli
def main():
    from desmoe.distributed import init_distributed
    init_distributed()
    libc = ctypes.CDLL(None)
    libc.__cxa_atexit(libc.abort, None, None)  # a library's teardown that aborts once Python has finished
    atexit.register(lambda: open({marker!r}, "w").write("exit handlers ran"))
    print("work done")  # stdout is a file here, as under Slurm: buffered, flushed at exit
    how = os.environ["HOW"]
    if how == "preempted":
        raise SystemExit(75)
    if how == "refused":
        raise UserError("key 'x': expected y")

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("how, code", [("finished", 0), ("preempted", 75), ("refused", 2)])
def test_a_finished_rank_exits_with_its_own_code(tmp_path, how, code):
    script, marker, out = tmp_path / "entry.py", tmp_path / "marker", tmp_path / "out.log"
    script.write_text(SCRIPT.format(root=str(ROOT), marker=str(marker)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with open(out, "w") as log:
        proc = subprocess.run([sys.executable, str(script)], env={**env, "HOW": how, "DS_ACCELERATOR": "cpu"},
                              stdout=log, stderr=subprocess.STDOUT, timeout=120)
    text = out.read_text()
    assert proc.returncode == code, text[-2000:]  # before: -6 (SIGABRT) whatever the run's outcome
    assert "work done" in text and marker.read_text() == "exit handlers ran"
    if how == "refused":
        assert "desmoe: error: key 'x': expected y" in text
