"""Whether a run may be resumed with the settings it is started with now: the experiment config and the
DeepSpeed JSON, compared with the records the checkpoint was written with (``RECORDS``, copied into every tag
by :func:`desmoe.checkpoint.save`; the run directory's own copies for older tags).  A difference that changes
the numbers or what a checkpoint holds is refused in one line naming the key."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from desmoe.errors import UserError


def latest_tag(ckpt_dir: str | Path):
    from desmoe.checkpoint import latest_tag as latest  # not at the top: checkpoint imports this module

    return latest(ckpt_dir)


# Keys a resumed run may change: how long it runs, how often it logs/saves/evaluates, the learning rate
# (the documented way out of a divergence), and where the run directory lies (a run moved to another disk
# resumes; which run it is, is where it now lies).  Everything else (model, data, method, optimisation) must
# match the run being resumed, or its checkpoint and results would mix two experiments; a recipe adds its own.
RESUMABLE_KEYS = ("train.steps", "train.lr", "train.log_every", "train.eval_", "train.save_every", "run.resume",
                  "run.keep_checkpoints", "run.dir",
                  "train.activation_checkpointing")  # recompute changes memory and time, not one number


def record_path(run_dir: str | Path, ckpt_dir: str | Path, name: str) -> Path:
    """The ``RECORDS`` file the latest tag was written with: its own copy, else (older tags) the run directory's,
    which every start rewrites (a resume at another world size killed before its first save left a wrong one)."""
    tag = latest_tag(ckpt_dir)
    return Path(ckpt_dir) / tag / name if tag and (Path(ckpt_dir) / tag / name).is_file() else Path(run_dir) / name


def check_resume_config(run_dir: str | Path, ckpt_dir: str | Path, cfg: Any,
                        resumable: tuple[str, ...] = RESUMABLE_KEYS) -> None:
    """Refuse to resume ``run_dir`` (one line) when its saved config.yaml differs from ``cfg``
    in any key outside ``resumable``. Nothing to check for a fresh run."""
    import yaml

    from desmoe.config import to_dict, with_defaults

    saved_path = record_path(run_dir, ckpt_dir, "config.yaml")
    if latest_tag(ckpt_dir) is None or not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{saved_path}: not valid YAML; fix it or start over with run.resume=false") from None
    saved = _flatten(with_defaults(saved, type(cfg)))  # a key added since the run was saved had its default
    changed = _changed(saved, _flatten(to_dict(cfg)), resumable)
    if changed:
        raise UserError(f"{run_dir}: resuming a run whose config differs in {changed}; "
                        f"use a new run.name or run.resume=false")


# DeepSpeed settings a resumed run may change: the learning rate (train.lr) and what only affects speed
# or logging.  Precision, ZeRO stage, clipping, Adam's other settings, batch sizes and the number of
# ranks change the numbers or what a checkpoint holds (ZeRO shards by rank): they must match.
DS_RECORD = "deepspeed.json"
RECORDS = ("config.yaml", DS_RECORD)  # the run directory's records of its settings, kept in every tag too
DS_RESUMABLE = ("optimizer.params.lr", "steps_per_print", "wall_clock_breakdown", "zero_optimization.overlap_comm",
                "zero_optimization.contiguous_gradients", "zero_optimization.reduce_bucket_size",
                "zero_optimization.allgather_bucket_size", "tensorboard.", "wandb.", "csv_monitor.", "comms_logger.",
                "flops_profiler.")


def ds_record(ds_config: dict, world_size: int) -> str:
    """What ``DS_RECORD`` holds: the resolved DeepSpeed config the run trains with and its world size."""
    import json

    return json.dumps({"world_size": world_size, **ds_config}, indent=1, sort_keys=True, default=str) + "\n"


def check_resume_deepspeed(run_dir: str | Path, ckpt_dir: str | Path, ds_config: dict, world_size: int) -> None:
    """Refuse (one line) to resume with DeepSpeed settings or a world size other than the saved run's
    ``DS_RECORD``.  Nothing to check for a fresh run or a run written before the record existed."""
    import json

    path = record_path(run_dir, ckpt_dir, DS_RECORD)
    if latest_tag(ckpt_dir) is None or not path.is_file():
        return
    try:
        saved = _flatten(json.loads(path.read_text()))
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON; fix it or start over with run.resume=false") from None
    changed = _changed(saved, _flatten(json.loads(ds_record(ds_config, world_size))), DS_RESUMABLE)
    if changed:
        raise UserError(f"{run_dir}: resuming a run whose DeepSpeed settings differ in {changed}; use the "
                        f"settings of its {DS_RECORD} and as many ranks, a new run.name or run.resume=false")


def _changed(saved: dict, current: dict, resumable: tuple[str, ...]) -> str:
    """The differing keys outside ``resumable``, shown as "key (old -> new)" (at most four), or ""."""
    changed = sorted(k for k in set(saved) | set(current)
                     if saved.get(k) != current.get(k) and not _resumable(k, resumable))
    shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed[:4])
    return shown + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def _resumable(key: str, resumable: tuple[str, ...]) -> bool:
    # An entry ending in "." or "_" names a family of keys, any other exactly one: as a bare prefix,
    # "train.steps" would also pass TRGE's train.steps_per_task, whose change moves every stage boundary
    # under the checkpoint's step cursor (the resumed run retrains a finished task, then crashes).
    return any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in resumable)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
