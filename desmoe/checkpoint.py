"""Checkpoints that are never half-written.

DeepSpeed writes a tag's files (model, per-expert, optimizer shards) into a
staging directory; once every rank has finished, rank 0 renames the tag into
place and only then rewrites the ``latest`` pointer (temp file + rename).  A
crash at any point leaves the previous checkpoint loadable.  Assumes the run
directory is on a filesystem all ranks share, as multi-node training does.

``save(..., trainable_only=True)`` leaves out parameters with ``requires_grad=False``
(a frozen backbone the run rebuilds anyway); ``load(..., trainable_only=True)`` then
accepts exactly those keys as missing and nothing else.  Only for parameters frozen
for good: a parameter the optimizer owns but has frozen for now (DES-MoE turns
``requires_grad`` off on frozen experts) makes such a save raise instead.
``save(..., keep=N)`` keeps the newest N tags, deleting older ones only once the new
one is in place.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from desmoe import integrity
from desmoe.errors import UserError

LATEST = "latest"
STAGING = ".staging"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir_atomic(tmp: str | Path, final: str | Path, seal: bool = False) -> Path:
    """Put the finished folder ``tmp`` at ``final``: the old copy is renamed aside
    before the new one is renamed in and only then deleted, so a crash at any point
    leaves a complete folder at ``final`` or at its ``.old`` neighbour, never nothing."""
    if seal:  # the manifest (desmoe/integrity.py) goes in with the folder, never after it
        integrity.seal(tmp)
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    import deepspeed.comm as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def save(engine, ckpt_dir: str | Path, step: int, client_state: Optional[dict[str, Any]] = None,
         trainable_only: bool = False, keep: int = 0) -> Path:
    """Write tag ``step`` atomically.  ``trainable_only``: leave out frozen (requires_grad=False)
    parameters.  ``keep`` > 0: afterwards delete all but the newest ``keep`` tags up to this step.
    Collective.  A write that fails on any rank (disk full, file size limit, read-only folder) stops every
    rank with one ``TrainingFailure`` line, the half-written staging tag removed and ``latest`` untouched."""
    root = Path(ckpt_dir)
    if trainable_only:
        _check_nothing_trained_is_dropped(engine)
    staging, tag = root / STAGING, tag_for(step)

    def prepare() -> None:
        # all of staging, not only this tag: what a killed job left there (a half-written tag of a step that is
        # never saved again, a pruned tag half-deleted) is never read and would hold its disk space for good;
        # nothing else writes here (the run lock keeps one job per run)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)

    _agree(_attempt(prepare) if _is_rank0() else None, root, tag)
    error = None
    try:
        engine.save_checkpoint(str(staging), tag=tag, client_state=dict(client_state or {}, step=step),
                               save_latest=False, exclude_frozen_parameters=trainable_only)
    except Exception as err:  # noqa: BLE001 - torch.save reports a failed write as RuntimeError, not OSError
        error = err
        # the peers wait in the barrier DeepSpeed's save ends with (its writes lie between its collectives):
        # meet them there, so every rank reaches the agreement below instead of hanging until the timeout
        _barrier()
    _agree(error or _attempt(lambda: _save_rng(staging / tag)), root, tag)

    def commit() -> None:
        for name in RECORDS:  # what this tag was written with (see record_path); the run's own copy is rewritten
            if (root.parent / name).is_file():  # at every start, before the resumed run has saved anything
                shutil.copyfile(root.parent / name, staging / tag / name)
        integrity.seal(staging / tag)  # every rank's files are complete (agreed above)
        final = root / tag
        if final.exists():  # re-saving a step: move the old copy aside first, then drop it
            old = root / STAGING / f"{tag}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging / tag, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging / tag, final)
        write_text_atomic(root / LATEST, tag)
        if keep > 0:
            try:
                prune(root, step, keep)
            except OSError as err:  # the save is complete and `latest` names it: stopping the run here said
                # "cannot save checkpoint <tag>; the last complete one is <tag>" about a save that succeeded
                print(f"desmoe: warning: {root}: an older checkpoint could not be removed ({type(err).__name__}: "
                      f"{err}); {tag} is saved, the older one stays on disk (remove it by hand)", flush=True)

    _agree(_attempt(commit) if _is_rank0() else None, root, tag)
    return root / tag


def _attempt(fn) -> Optional[BaseException]:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - reported by _agree on every rank
        return err
    return None


def _agree(error: Optional[BaseException], root: Path, tag: str) -> None:
    """Collective (also the barrier between the phases of a save): raise the first failing rank's error on
    every rank, in one line, after removing the staging copy of ``tag``."""
    from desmoe.collectives import all_gather_object, any_rank
    from desmoe.errors import TrainingFailure

    if not any_rank(error is not None):
        return
    why = None
    if error is not None:
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
        try:  # torch reports a full disk as "unexpected pos N vs M": the free space says what it was.  Measured
            # here, by the failing rank, at the failure: every rank must print the same line, and a figure each
            # rank took for itself differed by the other writes in between (a full suite: 55119 vs 55120 MiB)
            why += f", {shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
        except OSError:
            pass
    rank, why = next((r, e) for r, e in enumerate(all_gather_object(why)) if e)
    if _is_rank0():  # a half-written tag is never read, but it holds the space a full disk needs back
        shutil.rmtree(root / STAGING / tag, ignore_errors=True)
    try:
        last = latest_tag(root)
    except UserError:
        last = None
    raise TrainingFailure(f"cannot save checkpoint {tag} (rank {rank}: {why}); the last complete checkpoint "
                          f"is {root / last if last else 'none'}; free space or make the folder writable, then resume")


def _check_nothing_trained_is_dropped(engine) -> None:
    opt = engine.optimizer
    # the module's own parameters: ZeRO-1/2 and DeepSpeed's bf16 optimizer keep them here (their
    # param_groups hold fp32 copies); a plain optimizer steps them directly
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    if groups is None:
        groups = [g["params"] for g in getattr(opt, "param_groups", [])]
    owned = {id(p) for ps in groups for p in ps}
    dropped = [n for n, p in engine.module.named_parameters() if not p.requires_grad and id(p) in owned]
    if dropped:
        more = f" (and {len(dropped) - 1} more)" if len(dropped) > 1 else ""
        raise ValueError(f"checkpoint.save(trainable_only=True) would drop '{dropped[0]}'{more}, which the "
                         f"optimizer trains but has frozen for now; save whole checkpoints")


def tags(ckpt_dir: str | Path) -> list[tuple[int, str]]:
    """(step, tag) of every finished checkpoint in ``ckpt_dir``, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"step(\d{8})", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p.name))
    return sorted(found)


def prune(ckpt_dir: str | Path, step: int, keep: int) -> None:
    """Keep tag ``step`` and the ``keep - 1`` newest tags before it; delete older ones.  Tags after
    ``step`` (left by a run resumed from an earlier tag) are not touched: they get re-saved.  Each
    doomed tag is first renamed into the staging area, so no half-deleted tag is ever visible."""
    root = Path(ckpt_dir)
    older = [t for s, t in tags(root) if s < step]
    doomed = older[: max(len(older) - (keep - 1), 0)]
    for tag in doomed:
        trash = root / STAGING / f"{tag}.deleting"
        shutil.rmtree(trash, ignore_errors=True)
        (root / STAGING).mkdir(parents=True, exist_ok=True)
        os.replace(root / tag, trash)
        shutil.rmtree(trash, ignore_errors=True)


def latest_tag(ckpt_dir: str | Path) -> Optional[str]:
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not tag:  # "" would name the checkpoint folder itself
        raise UserError(f"{pointer}: is empty; write the tag of a checkpoint in {ckpt_dir} into it, or remove it")
    if not (Path(ckpt_dir) / tag).is_dir():
        raise UserError(f"{pointer}: points to '{tag}', which does not exist in {ckpt_dir}")
    return tag


def load(engine, ckpt_dir: str | Path, tag: Optional[str] = None, module_only: bool = False,
         trainable_only: bool = False, verify_hashes: bool = False) -> Optional[dict]:
    """Load ``tag`` (default: latest); returns the client state, or None if there is nothing.
    ``trainable_only``: the checkpoint may lack frozen (requires_grad=False) parameters, which keep
    their current values; any other missing or unexpected key is still an error."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    integrity.verify(Path(ckpt_dir) / tag, "checkpoint", hashes=verify_hashes)  # never read a short file
    custom = _load_allowing_frozen(Path(ckpt_dir) / tag) if trainable_only else None
    try:
        path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=module_only,
                                             load_optimizer_states=not module_only,
                                             load_lr_scheduler_states=not module_only, custom_load_fn=custom)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        hint = ""
        if "layout does not match" in str(err) or "size mismatch" in str(err):
            hint = (" (written with another ep_size, model shape or grouping of experts into optimizer groups?"
                    " resume weights only with module_only=True)")
        raise UserError(f"{Path(ckpt_dir) / tag}: cannot load checkpoint: {type(err).__name__}: {first}{hint}") from None
    if path is None:
        raise UserError(f"{Path(ckpt_dir) / tag}: not a loadable DeepSpeed checkpoint")
    if not module_only:
        _load_rng(Path(ckpt_dir) / tag)
    return state or {}


def _load_allowing_frozen(where: Path):
    """A DeepSpeed ``custom_load_fn``: a non-strict load whose missing keys must all be frozen
    parameters of the module (a dropped adapter must never load silently)."""

    def load_fn(src, dst) -> None:
        result = dst.load_state_dict(src, strict=False)
        frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
        missing = sorted(set(result.missing_keys) - frozen)
        if missing or result.unexpected_keys:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            what = (f"lacks trainable key '{missing[0]}'{more}" if missing
                    else f"has key '{result.unexpected_keys[0]}' the model does not")
            raise UserError(f"{where}: checkpoint {what} (written by another model or method?)")

    return load_fn


def _rank() -> int:
    import deepspeed.comm as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _save_rng(tag_dir: Path) -> None:
    """Each rank's generators (torch, CUDA, Python, NumPy), so randomness resumes too."""
    import random

    import numpy as np
    import torch

    from desmoe.distributed import use_cuda

    # This rank's device only (init_distributed made it current): a list of every visible device's state,
    # indexed by this process's device numbers, could not be set where a resume sees fewer devices (an
    # elastic resume onto another node layout: "invalid device ordinal") and gave a rank whose local rank
    # changed another device's stream.
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "cuda": torch.cuda.get_rng_state() if use_cuda() else None}
    torch.save(state, tag_dir / f"rng_state_rank{_rank():05d}.pt")


def _load_rng(tag_dir: Path) -> None:
    import random
    import warnings

    import numpy as np
    import torch

    path = tag_dir / f"rng_state_rank{_rank():05d}.pt"
    if not path.is_file():  # e.g. resumed with more ranks than were saved
        warnings.warn(f"{path} missing: this rank's random generators start fresh")
        return
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    from desmoe.distributed import use_cuda

    cuda = state["cuda"]
    if cuda is not None and use_cuda():
        if not isinstance(cuda, (list, tuple)):
            torch.cuda.set_rng_state(cuda)  # this rank's device
        elif len(cuda) == torch.cuda.device_count():  # an older checkpoint: every device, the same layout
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"{path}: CUDA generator states of {len(cuda)} devices, {torch.cuda.device_count()} "
                          f"visible now: this rank's CUDA generator starts fresh")


# What a resumed run may change, checked against the records each tag keeps (desmoe/resume_checks.py); kept
# importable from here, where callers have always found them.
from desmoe.resume_checks import (DS_RECORD, DS_RESUMABLE, RECORDS, RESUMABLE_KEYS, _changed,  # noqa: E402,F401
                                  check_resume_config, check_resume_deepspeed, ds_record, record_path)
