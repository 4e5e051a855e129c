"""Read tensors of an HF checkpoint directory one at a time (and experts by id).

Safetensors files are opened lazily, so a rank reads only the tensors it asks
for -- and for fused expert tensors only the rows of its own experts.  Keys are
normalised to transformers-5 module names (e.g. Mixtral's ``block_sparse_moe``
-> ``mlp``); experts are found either fused (``experts.gate_up_proj``) or one
tensor per expert (``experts.<g>.gate_proj.weight`` ...).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from desmoe.errors import UserError


def checkpoint_config(path: str | Path):
    """The HF config of a checkpoint directory, or one clear line saying why not."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path / 'config.json'}: not a loadable Hugging Face config ({first})") from None


class CheckpointTensors:
    def __init__(self, path: str | Path, renames: Iterable[tuple[str, str]] = ()) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path}: no *.safetensors weight files (save the model with "
                            f"save_pretrained(..., safe_serialization=True))")
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self._where: dict[str, tuple[Path, str]] = {}  # normalised key -> (file, key on disk)
        for f, handle in self._handles.items():
            for key in handle.keys():
                name = key
                for old, new in renames:
                    name = name.replace(old, new)
                self._where[name] = (f, key)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str, rows: slice | None = None) -> Tensor:
        if key not in self._where:
            raise UserError(f"{self.path}: tensor '{key}' missing from the checkpoint")
        f, disk_key = self._where[key]
        if rows is None:
            return self._handles[f].get_tensor(disk_key)
        return self._handles[f].get_slice(disk_key)[rows.start:rows.stop]

    def experts(self, prefix: str, ids: range, legacy: tuple[str, str, str]) -> tuple[Tensor, Tensor]:
        """(gate_up [n, 2f, d], down [n, d, f]) of experts ``ids`` of the block at ``prefix``."""
        fused = f"{prefix}.experts.gate_up_proj"
        if fused in self:
            rows = slice(ids.start, ids.stop)
            return self.get(fused, rows), self.get(f"{prefix}.experts.down_proj", rows)
        gate, up, down = legacy
        gate_up = [torch.cat([self.get(f"{prefix}.experts.{g}.{gate}.weight"),
                              self.get(f"{prefix}.experts.{g}.{up}.weight")]) for g in ids]
        downs = [self.get(f"{prefix}.experts.{g}.{down}.weight") for g in ids]
        return torch.stack(gate_up), torch.stack(downs)
