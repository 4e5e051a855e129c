"""Seeded Q/A from DeepMind's ``mathematics_dataset`` (pinned wheel, read from the cache).

The generator runs in a subprocess of this interpreter (see ``mathgen_worker.py``
for the compatibility shims); its only extra dependency, ``six``, is a pinned
source too.  Results are cached per (regime, count, seed) in the build's work
folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from desmoe.errors import UserError

WORKER = Path(__file__).resolve().parent / "mathgen_worker.py"


def generate(ctx, regime: str, per_module: int, seed: int) -> list[dict]:
    out = ctx.workdir / f"mathgen-{regime}-{per_module}-{seed}.jsonl"
    if not out.is_file():
        package, six = ctx.folder("math-generator"), ctx.folder("py-six")
        tmp = out.with_suffix(".tmp")
        proc = subprocess.run([sys.executable, str(WORKER), str(package), str(six), regime, str(per_module),
                               str(seed), str(tmp)], capture_output=True, text=True, timeout=3600)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"source 'math-generator': mathematics_dataset failed ({last}); "
                            f"set mathgen.enabled=false to build without it")
        tmp.replace(out)
    return [json.loads(line) for line in out.read_text().splitlines()]
