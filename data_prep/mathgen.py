"""Seeded Q/A from DeepMind's ``mathematics_dataset`` (pinned wheel, read from the cache).

The generator runs in a subprocess of this interpreter (see ``mathgen_worker.py``
for the compatibility shims); its only extra dependency, ``six``, is a pinned
source too.  Results are cached per (regime, count, seed) in the build's work
folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from desmoe.errors import UserError

WORKER = Path(__file__).resolve().parent / "mathgen_worker.py"


def _path(ctx, regime: str, per_module: int, seed: int) -> Path:
    # keyed by the worker's code too: a fix to it (its shims decide which problems a seed gives) must not
    # be hidden by problems an earlier worker cached
    code = hashlib.sha256(WORKER.read_bytes()).hexdigest()[:12]
    return ctx.workdir / f"mathgen-{regime}-{per_module}-{seed}-{code}.jsonl"


def run_worker(package: Path, six: Path, regime: str, per_module: int, seed: int, out: Path,
               only: str = "") -> subprocess.Popen:
    # the generator draws from sets, whose order follows string hashing: fix the hash seed,
    # or the same seed gives different problems in different processes
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, str(WORKER), str(package), str(six), regime, str(per_module), str(seed),
                             str(out), only], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def prepare(ctx, jobs: list[tuple[str, int, int]]) -> None:
    """Run the missing (regime, per_module, seed) jobs, concurrently (one process each)."""
    todo = [(j, _path(ctx, *j)) for j in dict.fromkeys(jobs) if not _path(ctx, *j).is_file()]
    if not todo:
        return
    package, six = ctx.folder("math-generator"), ctx.folder("py-six")
    procs = [(out, run_worker(package, six, regime, n, seed, out.with_suffix(".tmp"))) for (regime, n, seed), out in todo]
    errors = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode:
            errors.append((err.strip().splitlines() or ["no output"])[-1])
        else:
            out.with_suffix(".tmp").replace(out)
    if errors:
        raise UserError(f"source 'math-generator': mathematics_dataset failed ({errors[0]}); "
                        f"set mathgen.enabled=false to build without it")


def generate(ctx, regime: str, per_module: int, seed: int) -> list[dict]:
    prepare(ctx, [(regime, per_module, seed)])
    return [json.loads(line) for line in _path(ctx, regime, per_module, seed).read_text().splitlines()]
