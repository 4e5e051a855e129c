"""The image task sequence as stored on disk, and its reader.

A sequence folder (written by ``python -m data_prep.images``) holds

    tasks.json          order, and per task: classnames, templates, source, licence, counts
    <task>.npz          train_x/test_x uint8 [N, H, W, 3], train_y/test_y int64
    cards/<task>.md     data card

Tasks flagged ``zero_shot_only`` are controls: a continual learner never trains on
them, it only evaluates them (forgetting of zero-shot ability).
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from desmoe import integrity
from desmoe.errors import UserError

INDEX = "tasks.json"


@dataclass
class ImageTask:
    name: str
    classnames: list[str]
    templates: list[str]  # each holds one "{}" for the class name; the first is the training template
    train_x: torch.Tensor  # uint8 [N, H, W, 3]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    zero_shot_only: bool = False
    source: str = ""
    licence: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, template: Optional[str] = None) -> list[str]:
        return [(template or self.templates[0]).format(c) for c in self.classnames]


def load_task_sequence(folder: str | Path, names: Optional[list[str]] = None,
                       include_zero_shot: bool = True) -> list[ImageTask]:
    """Tasks in their stored order (or in the order of ``names``)."""
    folder = Path(folder)
    index_path = folder / INDEX
    if not index_path.is_file():
        raise UserError(f"{folder}: not an image task sequence ({INDEX} missing); build one with "
                        f"`python -m data_prep.images --profile tiny --out {folder}`")
    integrity.verify(folder, "image task folder")
    try:
        index = json.loads(index_path.read_text())
        entries = {t["name"]: t for t in index["tasks"]}
        listed = [t["name"] for t in index["tasks"]]
        if len(entries) != len(listed):  # one npz per name: the task would be read (and trained) twice
            raise UserError(f"{index_path}: task '{next(n for n in listed if listed.count(n) > 1)}' is listed "
                            f"twice; expected distinct task names (one <name>.npz each)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{index_path}: not a valid task index (expected JSON with a 'tasks' list of "
                        f"{{'name': ...}} entries; {type(err).__name__}: {err}); rebuild the folder") from None
    order = names if names is not None else [t["name"] for t in index["tasks"]]
    tasks = []
    for name in order:
        if name not in entries:
            raise UserError(f"{index_path}: no task '{name}' (have: {', '.join(entries)})")
        entry = entries[name]
        if entry.get("zero_shot_only") and not include_zero_shot and names is None:
            continue
        path = folder / f"{name}.npz"
        if not path.is_file():
            raise UserError(f"{path}: task file missing (listed in {INDEX})")
        arrays = _read_arrays(path)
        tasks.append(ImageTask(name=name, classnames=list(entry["classnames"]), templates=list(entry["templates"]),
                               zero_shot_only=bool(entry.get("zero_shot_only", False)),
                               source=entry.get("source", ""), licence=entry.get("licence", ""),
                               meta=entry.get("meta", {}), **arrays))
    return tasks


def _read_arrays(path: Path) -> dict[str, torch.Tensor]:
    """The four arrays of a (possibly user-built) ``<task>.npz``; anything else is one line naming the file.
    A missing array or a broken file was a KeyError / BadZipFile traceback, and int32 labels (what many tools
    write) stopped inside the first training step (cross_entropy takes int64); integer labels are exact as int64."""
    keys = ("train_x", "train_y", "test_x", "test_y")
    try:
        with np.load(path) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise UserError(f"{path}: no '{missing[0]}' array (has: {', '.join(z.files) or 'none'}); expected "
                                f"{', '.join(keys)}")
            arrays = {k: torch.from_numpy(z[k].copy()) for k in keys}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError) as err:  # not an npz, object arrays
        raise UserError(f"{path}: not a readable task file ({type(err).__name__}: {' '.join(str(err).split())[:120]}); "
                        f"expected an .npz of uint8 images and integer labels") from None
    for k in ("train_y", "test_y"):
        y = arrays[k]
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise UserError(f"{path}: '{k}' is {y.dtype}; expected integer class labels")
        arrays[k] = y.long()
    return arrays


def save_task(folder: str | Path, task: ImageTask) -> Path:
    """Write ``<name>.npz`` atomically (the index is written separately by :func:`save_index`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{task.name}-", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, train_x=task.train_x.numpy(), train_y=task.train_y.numpy(),
                 test_x=task.test_x.numpy(), test_y=task.test_y.numpy())
        os.replace(tmp, folder / f"{task.name}.npz")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return folder / f"{task.name}.npz"


def task_entry(task: ImageTask) -> dict:
    return {"name": task.name, "classnames": task.classnames, "templates": task.templates,
            "zero_shot_only": task.zero_shot_only, "source": task.source, "licence": task.licence,
            "num_train": int(task.train_y.numel()), "num_test": int(task.test_y.numel()),
            "image_shape": list(task.train_x.shape[1:]), "meta": task.meta}


def save_index(folder: str | Path, entries: list[dict], extra: Optional[dict] = None) -> Path:
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tasks-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({**(extra or {}), "tasks": entries}, f, indent=1)
    os.replace(tmp, folder / INDEX)
    return folder / INDEX
