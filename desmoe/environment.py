"""What a run ran on: code, software and hardware, one JSON line per start of a run (``environment.jsonl``).

Why: a run is bit-reproducible on one machine and software stack, but not across them.  The embedded
demo's FFT exact match read 0.345 and 0.240 on two fresh clones of functionally identical code, while a
second run on either stack repeats its own figures exactly (docs/performance.md); the package versions
pip resolves on the day (sentencepiece trains the demo's tokenizer) and the CPU's GEMM kernels are the
likely differences.  Without this record a number cannot be traced to the stack that produced it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

PACKAGES = ("torch", "deepspeed", "transformers", "numpy", "sentencepiece", "tokenizers", "datasets", "lm_eval",
            "megatron-core", "accelerate", "peft", "safetensors")
ENV_VARS = ("OMP_NUM_THREADS", "DS_ACCELERATOR", "DESMOE_GROUPED_MM", "DESMOE_KEEP_HEAP", "CUDA_VISIBLE_DEVICES")
ROOT = Path(__file__).resolve().parents[1]


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _git() -> dict:
    """The commit, whether tracked files differ from it and, when they do, the sha256 of ``git diff HEAD``
    (which edit); empty outside a git checkout (an installed wheel)."""
    if not (ROOT / ".git").exists():
        return {}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if head.returncode:
        return {}
    out = {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    if out["dirty"]:
        try:
            diff = subprocess.run(["git", "diff", "HEAD", "--"], cwd=ROOT, capture_output=True, timeout=30)
            out["diff_sha256"] = hashlib.sha256(diff.stdout).hexdigest()[:12]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return out


_PROCESS_GIT: dict | None = None  # the tree at this process's first run start, just after its imports


def _process_git() -> tuple[dict, dict | None]:
    """(the tree this process loaded, the tree now if it changed since).  A launch that runs several runs
    imports the code once: a later run's start must not report an edit made while the launch ran as the
    code it ran (a study launch ran three runs on code imported before a commit its later runs named)."""
    global _PROCESS_GIT
    now = _git()
    if _PROCESS_GIT is None:
        _PROCESS_GIT = now
    return _PROCESS_GIT, (now if now != _PROCESS_GIT else None)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int | None:
    """The CPUs this process may run on (a Slurm or container cpuset, taskset): os.cpu_count() is the
    machine's, 64 on a node where the job got 4, which says nothing of the speed a run could have."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def describe(world_size: int = 1) -> dict:
    cuda = torch.cuda.is_available()
    loaded, now = _process_git()
    return {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": loaded,
        **({"git_now": now} if now is not None else {}),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": _usable_cores(),
                "torch_threads": torch.get_num_threads()},
        "accelerator": ({"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                         "cuda": torch.version.cuda} if cuda else None),
        "world_size": world_size,
        "packages": {name: _version(name) for name in PACKAGES},
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
