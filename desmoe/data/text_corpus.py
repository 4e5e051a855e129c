"""A byte-level corpus of real text that every Python installation ships.

The core's smoke job needs real (not random) text without any download: the
standard library's own source files are English prose (docstrings, comments)
interleaved with code.  Users can point ``path`` at any folder of text files.
Files are split into train/validation by a hash of their relative path, so the
split is deterministic and disjoint by document.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from desmoe.config import bad
from desmoe.errors import UserError


@dataclass
class TextCorpusConfig:
    path: Optional[str] = None  # folder of text files; None = Python's standard library sources
    pattern: str = "*.py"
    max_bytes: int = 4_000_000
    val_fraction: float = 0.05

    def check(self) -> None:
        if self.max_bytes < 10_000:
            raise bad("max_bytes", "at least 10000", self.max_bytes)
        if not 0 < self.val_fraction < 0.5:
            raise bad("val_fraction", "a number in (0, 0.5)", self.val_fraction)


def _files(cfg: TextCorpusConfig) -> tuple[Path, list[Path]]:
    root = Path(cfg.path) if cfg.path else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"data.path='{root}': not a directory")
    files = sorted(p for p in root.rglob(cfg.pattern) if p.is_file() and "site-packages" not in p.parts)
    if not files:
        raise UserError(f"data.path='{root}': no files match '{cfg.pattern}'")
    return root, files


def load_byte_corpus(cfg: TextCorpusConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, validation bytes) as uint8 tensors; validation gets val_fraction of max_bytes."""
    root, files = _files(cfg)
    train, val = bytearray(), bytearray()
    val_budget = int(cfg.max_bytes * cfg.val_fraction)
    train_budget = cfg.max_bytes - val_budget
    for path in files:
        digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
        is_val = digest[0] / 256.0 < cfg.val_fraction
        target, budget = (val, val_budget) if is_val else (train, train_budget)
        if len(target) < budget:
            target.extend(path.read_bytes()[: budget - len(target)] + b"\n")
        if len(train) >= train_budget and len(val) >= val_budget:
            break
    if len(train) < 10_000 or len(val) < 1_000:
        raise UserError(f"data.path='{root}': too little text ({len(train)} train / {len(val)} validation bytes)")
    return torch.frombuffer(train, dtype=torch.uint8).clone(), torch.frombuffer(val, dtype=torch.uint8).clone()


def sample_windows(data: torch.Tensor, batch: int, length: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """Random windows for (step, rank): a pure function of its arguments, so a resumed
    run sees exactly the batches an uninterrupted one would."""
    gen = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFFFFFF)
    starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + length] for s in starts.tolist()]).long()
