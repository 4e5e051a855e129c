"""The run record (desmoe.environment) names the CPUs the run could use, not only the machine's count: in a
Slurm or container cpuset (or under taskset) the two differ, and a timing cannot be traced without it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_record_names_the_cpus_the_process_may_use():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    one = min(os.sched_getaffinity(0))
    code = (f"import os, json; os.sched_setaffinity(0, {{{one}}}); from desmoe.environment import describe; "
            "print(json.dumps(describe()['cpu']))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpu = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cpu["usable_cores"] == 1 and cpu["logical_cores"] == os.cpu_count()
