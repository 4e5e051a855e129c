"""Elastic resume: continue a run saved at one world size (and EP size) at another, exactly.

A ZeRO-1/2 checkpoint holds one optimizer file per rank: each rank's slice of every optimizer group's
flat fp32 master copy and Adam moments (``zero_pp_rank_R_...``), with DeepSpeed's map of which
parameter lies where in the slice (``param_slice_mappings``).  Model weights are saved whole (dense)
and one file per global expert id, which DeepSpeed reloads at any EP size.  DeepSpeed's own way
between world sizes, the universal checkpoint, converts only its AutoEP layers (not the native MoE
layers desmoe runs on), and its ZeRO-2 "elastic" load needs one Adam step count for every group,
which per-expert freezing breaks.  So the conversion is ours, in memory, writing nothing:

1. DeepSpeed loads the weights, step counters and client state (``load_optimizer_states=False``);
2. every rank reads all saved optimizer files, glues each group's slices back into whole tensors
   per parameter (fp32 master, exp_avg, exp_avg_sq) and its step count, found by group name
   (``moe3.expert5`` names a global expert, so groups match across EP sizes);
3. each rank cuts its own slices of its own groups from them, in the new flat order and padding.

Nothing is rounded or recomputed: the new engine holds the saved numbers bit for bit.

The data streams continue at the same global sample: a step's ``ranks x grad_accum`` micro-batches
are slots of one global batch, and the run keeps the stream keys of the layout it started with
(``DataLayout``, saved in the client state), so 2 ranks x 1 and 1 rank x 2 draw the same samples.
The global batch (``train.micro_batch x train.grad_accum x ranks``) must stay what it was: the
recipes' schedules and stream positions count steps of that batch.  A loss that averages over counted
labels (DES-MoE's instruction data) keeps the saved layout's weights too (``label_scales``).

A recipe opts in with an empty ``Recipe.inelastic`` (smoke, pretraining, DES-MoE and its baselines);
every other one names its obstacle there, and ``plan`` refuses with it in one line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from desmoe.errors import UserError

# config keys an elastic resume may change with the world size (the rest must still match)
ELASTIC_KEYS = ("train.grad_accum", "model.ep_size")
LAYOUT_KEY = "data_layout"  # client state: [world, grad_accum] whose stream keys the run draws
_EXPERT = re.compile(r"(deepspeed_experts)\.\d+\.")  # a local expert index inside a parameter name


@dataclass(frozen=True)
class DataLayout:
    """The (ranks, micro-batches a step) whose stream keys a run draws its batches with."""

    world: int
    accum: int

    def key(self, index: int, rank: int, world: int, accum: int) -> tuple[int, int, int]:
        """Micro-batch ``index`` (step * accum + micro) of ``rank`` in a world of ``world`` x ``accum``
        -> (index, rank, world) of the same global slot in this layout: slot = rank * accum + micro."""
        if (world, accum) == (self.world, self.accum):
            return index, rank, world
        step, micro = divmod(index, accum)
        old_rank, old_micro = divmod(rank * accum + micro, self.accum)
        return step * self.accum + old_micro, old_rank, self.world


def data_layout(state: Optional[dict], world: int, accum: int) -> DataLayout:
    """The layout a (resumed) run draws with: the checkpoint's, else (a fresh run, or one saved before
    layouts were kept, when the world size could not change) the current one."""
    saved = (state or {}).get(LAYOUT_KEY)
    return DataLayout(*saved) if saved else DataLayout(world, accum)


def key(trainer, index: int) -> tuple[int, int, int]:
    """(index, rank, world) whose stream draws micro-batch ``index`` (step * grad_accum + micro) of this rank."""
    return trainer.data_layout.key(index, trainer.rank, trainer.world, trainer.grad_accum)


def stream(trainer, open_at: Callable[[int, int, int], Iterator], first: int) -> Iterator:
    """This rank's micro-batches ``first, first + 1, ...``: ``open_at(index, rank, world)`` opens the stream of
    a rank positioned at a micro-batch.  In the run's own layout that is one plain stream, as before; after a
    change of world size each micro-batch comes from its slot's stream, an open one reused while it is in
    sequence (a rank that took over several saved ranks reads each of their streams in turn)."""
    if trainer.data_layout == DataLayout(trainer.world, trainer.grad_accum):
        yield from open_at(first, trainer.rank, trainer.world)
        return
    open_streams: dict[tuple[int, int], list] = {}  # (rank, world) -> [its next index, iterator]
    index = first
    while True:
        i, r, w = key(trainer, index)
        cur = open_streams.get((r, w))
        if cur is None or cur[0] != i:
            cur = open_streams[(r, w)] = [i, open_at(i, r, w)]
        cur[0] += 1
        yield next(cur[1])
        index += 1


def label_scales(trainer, counted: list[int]) -> list[float]:
    """Scales of this rank's micro-batch losses (each the mean over its counted labels, e.g. responses) that
    weigh a step's labels as the run's own layout does: a rank's loss is the mean over all its micro-batches'
    labels (scale ``accum x`` its share of them, 1.0 where the rank counted none) and DeepSpeed averages the
    ranks.  After a change of world size the groups are the saved ranks' slots, whose counts may lie on other
    ranks now: then collective (every rank's counts), else local.  ``layout.accum x share`` / (new ranks x
    new accum) = share / saved ranks: the saved run's weight of every label, at any world size."""
    layout, accum, rank = trainer.data_layout, trainer.grad_accum, trainer.rank
    if layout == DataLayout(trainer.world, accum):
        total = sum(counted)
        return [accum * c / total if total else 1.0 for c in counted]
    from desmoe.collectives import all_gather_object

    def owner(r: int, m: int) -> int:  # the saved rank whose slot micro-batch m of rank r fills
        return (r * accum + m) // layout.accum

    totals: dict[int, int] = {}
    for r, per_micro in enumerate(all_gather_object(list(counted))):
        for m, c in enumerate(per_micro):
            totals[owner(r, m)] = totals.get(owner(r, m), 0) + c
    return [layout.accum * c / totals[owner(rank, m)] if totals[owner(rank, m)] else 1.0
            for m, c in enumerate(counted)]


def saved_record(run_dir: Path, ckpt_dir: Path) -> Optional[dict]:
    """The DeepSpeed record of the run being resumed, or None (fresh run, or no record kept)."""
    from desmoe.checkpoint import DS_RECORD, latest_tag, record_path

    path = record_path(run_dir, ckpt_dir, DS_RECORD)  # the latest tag's copy: what its files were written with
    if latest_tag(ckpt_dir) is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON; fix it or start over with run.resume=false") from None


def plan(run_dir: Path, ckpt_dir: Path, ds_config: dict, world: int, recipe) -> Optional[dict]:
    """None when the run resumes at its saved world size (or is fresh); else the saved DeepSpeed record,
    after refusing in one line what cannot convert exactly.  Call before the engine exists."""
    saved = saved_record(run_dir, ckpt_dir)
    if saved is None or saved.get("world_size") == world:
        return None
    was = saved.get("world_size")
    if recipe.inelastic:
        raise UserError(f"{run_dir}: saved with {was} ranks, resumed with {world}: {recipe.name} does not convert "
                        f"between world sizes ({recipe.inelastic}); resume with {was} ranks")
    stage = (saved.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (1, 2):
        raise UserError(f"{run_dir}: saved with {was} ranks, resumed with {world}: only ZeRO-1/2 checkpoints convert "
                        f"(its deepspeed.json has zero_optimization.stage={stage}); resume with {was} ranks")
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    old = saved.get("train_micro_batch_size_per_gpu", 0) * saved.get("gradient_accumulation_steps", 0) * was
    if micro * accum * world != old:
        fit = old / (micro * world)
        how = (f"train.grad_accum={int(fit)} keeps it" if fit == int(fit) and fit >= 1
               else f"no train.grad_accum keeps it at train.micro_batch={micro} on {world} ranks")
        raise UserError(f"{run_dir}: resuming with {world} ranks would change the global batch from {old} to "
                        f"{micro * accum * world} samples (train.micro_batch x train.grad_accum x ranks); {how}")
    return saved


def as_saved(ds_config: dict, world: int, saved: Optional[dict]) -> tuple[dict, int]:
    """(DeepSpeed config, world size) to compare with the saved record: an elastic resume may change
    the world size and the accumulation that keeps the global batch, nothing else."""
    if saved is None:
        return ds_config, world
    return dict(ds_config, gradient_accumulation_steps=saved["gradient_accumulation_steps"]), saved["world_size"]


def load(engine, ckpt_dir: str | Path, saved_world: int, trainable_only: bool = False) -> dict:
    """Load the latest tag of a run saved with ``saved_world`` ranks into ``engine`` (any world size):
    weights, counters and client state through DeepSpeed, the optimizer state converted here."""
    from desmoe import checkpoint, integrity

    tag = checkpoint.latest_tag(ckpt_dir)
    where = Path(ckpt_dir) / tag
    integrity.verify(where, "checkpoint")  # never read a short file
    # DeepSpeed names a bf16 engine's files bf16_zero_pp_rank_*; the precision is the saved run's (a change of
    # bf16.enabled at resume is refused by checkpoint.check_resume_deepspeed)
    prefix = "bf16_" if engine.bfloat16_enabled() else ""
    files = [where / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(saved_world)]
    missing = [f for f in files if not f.is_file()]
    if missing or (where / f"{prefix}zero_pp_rank_{saved_world}_mp_rank_00_optim_states.pt").exists():
        raise UserError(f"{where}: expected the optimizer files of {saved_world} ranks (deepspeed.json's world_size), "
                        f"found {len(list(where.glob(f'{prefix}zero_pp_rank_*_optim_states.pt')))}")
    custom = checkpoint._load_allowing_frozen(where) if trainable_only else None
    try:
        path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=False,
                                             load_lr_scheduler_states=False, custom_load_fn=custom)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{where}: cannot load checkpoint weights at another world size: {first}") from None
    if path is None:
        raise UserError(f"{where}: not a loadable DeepSpeed checkpoint")
    saved = _saved_groups(files, where)
    _set_optimizer(engine, saved, where)
    checkpoint._load_rng(where)  # ranks beyond the saved ones start fresh generators (with a warning)
    return state or {}


def _group_key(name: str, group: dict) -> str:
    """A parameter's name within its group, free of where its expert lives: an expert group holds one
    global expert (its name says which), whose local index differs between EP sizes."""
    from desmoe.moe.trainability import EXPERT_KEY

    members = group.get(EXPERT_KEY)
    if members is None:
        return name
    if len(members) != 1:
        raise UserError(f"optimizer group '{group.get('name')}' holds {len(members)} experts (an expert unit): "
                        f"such groups are not converted between world sizes; resume with the saved world size")
    return _EXPERT.sub(r"\1.*.", name)


def _group_ids(groups: list[dict]) -> list[str]:
    """A name for each optimizer group that holds across EP sizes: dense groups keep desmoe's name; DeepSpeed
    renames expert groups after their EP group ("ep_size_2"), so they go by their unit (one global expert)
    and their place among that unit's groups (decay first, as built)."""
    from desmoe.moe.trainability import UNIT_KEY

    seen: dict[str, int] = {}
    out = []
    for g in groups:
        if UNIT_KEY not in g:
            out.append(str(g["name"]))
            continue
        unit = repr(tuple(g[UNIT_KEY]) if isinstance(g[UNIT_KEY], list) else g[UNIT_KEY])
        seen[unit] = seen.get(unit, -1) + 1
        out.append(f"experts{unit}#{seen[unit]}")
    return out


def _saved_groups(files: list[Path], where: Path) -> dict[str, dict]:
    """group name -> {"hyper": its settings, "step": Adam's step (None: never stepped), "params":
    {key: (fp32, exp_avg, exp_avg_sq) whole}} from every rank's slices (rank order = slice order)."""
    parts: dict[str, list] = {}
    for f in files:
        osd = torch.load(f, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        if not isinstance(base, dict) or any(any(p) for p in osd.get("param_alignment_paddings", [])):
            raise UserError(f"{f}: an elastic or parameter-aligned ZeRO layout; only the default layout converts")
        for i, (group, name) in enumerate(zip(base["param_groups"], _group_ids(base["param_groups"]))):
            parts.setdefault(name, []).append(
                (group, osd["single_partition_of_fp32_groups"][i], base["state"].get(i), osd["param_slice_mappings"][i]))
    out = {}
    for name, slices in parts.items():
        group = slices[0][0]
        fp32 = torch.cat([s[1].float() for s in slices])  # saved without the last slice's padding
        stepped = [s[2] is not None and "exp_avg" in s[2] for s in slices]
        if any(stepped) != all(stepped):
            raise UserError(f"{where}: optimizer group '{name}' has Adam state on some ranks only")
        moments = ([torch.cat([s[2][k][: s[1].numel()] for s in slices]) for k in ("exp_avg", "exp_avg_sq")]
                   if all(stepped) else None)
        sizes: dict[str, int] = {}
        for s in slices:
            for pname, frag in s[3].items():
                sizes[pname] = sizes.get(pname, 0) + frag.numel
        if sum(sizes.values()) != fp32.numel():
            raise UserError(f"{where}: optimizer group '{name}': slices of {fp32.numel()} values for parameters of "
                            f"{sum(sizes.values())}")
        params, at = {}, 0
        for pname, n in sizes.items():  # the flat order: parameters laid end to end
            whole = [fp32[at:at + n]] + ([m[at:at + n] for m in moments] if moments else [])
            params[_group_key(pname, group)] = whole
            at += n
        out[name] = {"hyper": group, "step": slices[0][2]["step"] if moments else None, "params": params}
    return out


def _set_optimizer(engine, saved: dict[str, dict], where: Path) -> None:
    """Cut this rank's slices of its groups from the whole saved tensors (DeepSpeed's flat order, the
    new padding) into the fp32 master partitions and Adam's state; the group settings come along."""
    import deepspeed.comm as dist

    from desmoe.collectives import all_gather_object

    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise UserError(f"{where}: converting between world sizes needs ZeRO-1/2 (zero_optimization.stage)")
    mine = _group_ids(zero.optimizer.param_groups)
    everywhere = {n for names_r in all_gather_object(mine) for n in names_r}
    if everywhere != set(saved):
        odd = sorted(everywhere ^ set(saved))
        raise UserError(f"{where}: optimizer group '{odd[0]}' is in the {'model' if odd[0] in everywhere else 'checkpoint'}"
                        f" only (another model, method or grouping of experts?)")
    for i, (group, gid) in enumerate(zip(zero.optimizer.param_groups, mine)):
        old = saved[gid]
        pieces = []
        for p in zero.round_robin_bit16_groups[i]:
            k = _group_key(engine.param_names[p], group)
            if k not in old["params"] or old["params"][k][0].numel() != p.numel():
                raise UserError(f"{where}: parameter '{engine.param_names[p]}' of optimizer group '{gid}' "
                                f"is missing from the checkpoint or has another size")
            pieces.append(old["params"][k])
        if len(pieces) != len(old["params"]):
            raise UserError(f"{where}: optimizer group '{gid}' holds {len(old['params'])} parameters in the "
                            f"checkpoint, {len(pieces)} in the model")
        flat = zero.single_partition_of_fp32_groups[i]
        size = flat.numel()
        part = dist.get_rank(group=zero.real_dp_process_group[i])
        cut = [_slice([pc[j] for pc in pieces], part, size) for j in range(3 if old["step"] is not None else 1)]
        flat.data.copy_(cut[0])
        state = zero.optimizer.state
        state.pop(flat, None)
        if old["step"] is not None:
            state[flat] = {"step": old["step"].clone() if torch.is_tensor(old["step"]) else old["step"],
                           "exp_avg": cut[1].to(flat.device), "exp_avg_sq": cut[2].to(flat.device)}
        for key, value in old["hyper"].items():
            if key not in ("params", "name", "moe"):  # DeepSpeed names expert groups by their EP size
                group[key] = value


def _slice(tensors: list[torch.Tensor], part: int, size: int) -> torch.Tensor:
    """Slice ``part`` (``size`` values) of the tensors laid end to end and zero-padded (DeepSpeed pads the end)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    out = torch.zeros(size, dtype=torch.float32)
    piece = flat[part * size:(part + 1) * size]
    out[: piece.numel()] = piece
    return out
