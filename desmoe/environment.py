"""What a run ran on: code, software and hardware, one JSON line per start of a run (``environment.jsonl``).

Why: a run is bit-reproducible on one machine and software stack, but not across them.  The embedded
demo's FFT exact match read 0.345 and 0.240 on two fresh clones of functionally identical code, while a
second run on either stack repeats its own figures exactly (docs/performance.md); the package versions
pip resolves on the day (sentencepiece trains the demo's tokenizer) and the CPU's GEMM kernels are the
likely differences.  Without this record a number cannot be traced to the stack that produced it.
"""
from __future__ import annotations

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
    """The commit and whether tracked files differ from it; empty outside a git checkout (an installed wheel)."""
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
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(world_size: int = 1) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": _git(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "accelerator": ({"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                         "cuda": torch.version.cuda} if cuda else None),
        "world_size": world_size,
        "packages": {name: _version(name) for name in PACKAGES},
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
