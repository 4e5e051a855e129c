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
from typing import Iterable, Optional

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
    from huggingface_hub.errors import StrictDataclassError

    try:
        # trust_remote_code=False: an ``auto_map`` of an architecture transformers lacks is refused here;
        # left unset, transformers asks "Do you wish to run the custom code? [y/N]" on stdin (every rank).
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError, StrictDataclassError) as err:
        # transformers 5 validates field types (StrictDataclassError, not a ValueError): its message spans
        # lines ("Validation error for field 'x':\n TypeError: ..."), the key is on the first, the value after.
        text = " ".join(str(err).split())[:300] or type(err).__name__
        raise UserError(f"{path / 'config.json'}: not a loadable Hugging Face config ({text})") from None


def refuse_untied_head(head: Tensor, embed: Tensor, config_json: Path) -> None:
    """``tie_word_embeddings: true`` with an ``lm_head.weight`` that differs from the embedding: transformers 5
    keeps that head untied (and warns); tying here would replace the head the checkpoint holds."""
    if not torch.equal(head.to(embed.dtype), embed):
        raise UserError(f"{config_json}: key 'tie_word_embeddings': expected false (the checkpoint's lm_head.weight "
                        f"differs from model.embed_tokens.weight), got True")


SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def weight_files(path: Path) -> dict[Path, Optional[set[str]]]:
    """The safetensors files transformers' ``from_pretrained`` reads from ``path``, each with the keys the
    index assigns it (None: all of its keys).  Its order: ``model.safetensors`` alone if present, else the
    files of ``model.safetensors.index.json``.  Other ``*.safetensors`` in the folder (a stale shard, an
    older copy, Mistral's ``consolidated.safetensors``) are not the model: reading them too put their
    values in place of the model's (a glob over ``*.safetensors`` did)."""
    if (path / SINGLE).is_file():
        return {path / SINGLE: None}
    index = path / INDEX
    if not index.is_file():
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        raise UserError(f"{path}: no {SINGLE} or {INDEX} (found: {', '.join(others) or 'no weight files'}; "
                        f"desmoe reads safetensors: save with save_pretrained)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: key 'weight_map': expected a non-empty {{tensor: file}} map")
    files: dict[Path, set[str]] = {}
    for key, name in weight_map.items():
        files.setdefault(path / str(name), set()).add(key)
    for f in files:
        if not f.is_file():
            raise UserError(f"{index}: key 'weight_map': file '{f.name}' listed there is missing")
    return files


LFS_POINTER = b"version https://git-lfs"


def _open(safe_open, f: Path):
    """safe_open, or one line naming the file: a clone without git-lfs leaves pointer files under the
    weights' names, an interrupted copy a truncated one (safetensors' bare SafetensorError named neither)."""
    try:
        return safe_open(str(f), framework="pt")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        with open(f, "rb") as fh:
            lfs = fh.read(len(LFS_POINTER)) == LFS_POINTER
        why = "a Git LFS pointer, not the weights: run 'git lfs pull'" if lfs else " ".join(str(err).split())[:200]
        raise UserError(f"{f}: not a readable safetensors file ({why})") from None


class CheckpointTensors:
    def __init__(self, path: str | Path, renames: Iterable[tuple[str, str]] = ()) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        files = weight_files(self.path)
        self._handles = {f: _open(safe_open, f) for f in files}
        self._where: dict[str, tuple[Path, str]] = {}  # normalised key -> (file, key on disk)
        named = {key: f.name for f, keys in files.items() for key in keys or ()}
        for f, handle in self._handles.items():
            listed = files[f]
            on_disk = set(handle.keys())
            if listed is not None and not listed <= on_disk:
                raise UserError(f"{self.path / INDEX}: key 'weight_map': tensor '{sorted(listed - on_disk)[0]}' "
                                f"is not in {f.name}")
            if listed is not None and on_disk - listed:
                # transformers reads every tensor of every shard the index names (the last file's copy wins),
                # this reader only the index's: a second copy (or an unlisted tensor, e.g. an lm_head beside
                # tie_word_embeddings) made the two models differ without a word
                extra = sorted(on_disk - listed)[0]
                raise UserError(f"{self.path / INDEX}: key 'weight_map': tensor '{extra}' is stored in {f.name}, but "
                                f"the index gives it {named.get(extra, 'no file')} (remove one copy or list it)")
            for key in on_disk if listed is None else listed:
                name = key
                for old, new in renames:
                    name = name.replace(old, new)
                if name in self._where:  # an old and a new name of one tensor (Mixtral's block_sparse_moe / mlp):
                    raise UserError(f"{self.path}: tensors '{self._where[name][1]}' and '{key}' are both "  # which is
                                    f"'{name}' (remove one of them)")  # the model is not for desmoe to guess
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
