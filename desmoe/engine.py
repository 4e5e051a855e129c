"""DeepSpeed engine construction: config resolution, optimizer groups, freezing.

The DeepSpeed JSON stays the user's file (``--deepspeed configs/zero2.json``).
Values of ``"auto"`` are resolved here (bf16 on when CUDA has it, batch sizes
from the experiment).  The optimizer block is read for its hyper-parameters but
built by us as :class:`FreezableAdamW` over per-expert groups, so expert
freezing is exact and no fused-Adam JIT build happens on CPU.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import weakref
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Optional

import torch
from torch import nn

from desmoe.distributed import use_cuda
from desmoe.ds_keys import check_blocks, check_top_level_keys, unknown_key
from desmoe.errors import ConfigError, UserError
from desmoe.moe.trainability import FreezableAdamW, Trainability, build_param_groups

OPTIMIZER_KEYS = {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode"}


def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a DeepSpeed JSON file")
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found")
    try:
        cfg = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: key '{err}' given twice in one object; remove one") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    _removed_by_deepspeed(cfg, str(path))
    check_top_level_keys(cfg, str(path))
    cfg["_source"] = str(path)
    return cfg


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """DeepSpeed refuses a key given twice when it reads a JSON file itself; json.loads keeps the last, and
    the dict handed to DeepSpeed would carry it silently."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _removed_by_deepspeed(cfg: Mapping[str, Any], source: str) -> None:
    """Blocks this DeepSpeed has removed (amp, elasticity, curriculum_learning, ...): it refuses them in
    deepspeed.initialize, after the model is built, with a traceback; read here, before the process groups."""
    from deepspeed.runtime import config as ds_config

    try:
        _removed_keys_check(ds_config)(cfg)
    except ds_config.DeepSpeedConfigError as err:
        raise ConfigError(f"{source}: {' '.join(str(err).split())}") from None


def _removed_keys_check(module: Any) -> Callable[[Mapping[str, Any]], None]:
    """DeepSpeed's own check of the blocks it removed, private (no public function reads a config without
    the process groups).  Missing, it must stop the run, not pass: before 0.19.7 DeepSpeed still honoured
    those blocks (``elasticity`` rewrote the batch sizes desmoe counts with), and a later rename would let
    them reach deepspeed.initialize."""
    check = getattr(module, "_reject_removed_config_keys", None)
    if not callable(check):
        import deepspeed

        raise UserError(f"deepspeed {deepspeed.__version__}: {module.__name__}._reject_removed_config_keys not "
                        f"found, which desmoe refuses DeepSpeed's removed config blocks with; install the "
                        f"DeepSpeed of constraints.txt (deepspeed>=0.19.7,<0.20)")
    return check


def fold_lr(exp: Any, ds_raw: Mapping[str, Any]) -> None:
    """One learning rate for the run, before anything reads ``exp.train.lr``: a number in the JSON's
    ``optimizer.params.lr`` becomes train.lr (the config dump, the logs, the recipes' schedules read it)
    unless the user set train.lr (YAML or override) to another value, which is refused; "auto" or no lr in
    the JSON leaves train.lr (the user's, else the recipe's default) to fill it.  Replacing the JSON's
    number with train.lr, as before, trained at a rate the user never chose without a word."""
    from desmoe.config import given_keys

    train = getattr(exp, "train", None)
    opt = ds_raw.get("optimizer")
    params = opt.get("params") if isinstance(opt, dict) else None
    json_lr = params.get("lr", "auto") if isinstance(params, dict) else "auto"
    if train is None or not hasattr(train, "lr") or json_lr == "auto" or not _is_num(json_lr, 0, open_low=True):
        return  # a value that is no learning rate is named by resolve_ds_config
    source = ds_raw.get("_source", "DeepSpeed config")
    given = given_keys(exp)
    if given is None:  # built in code, not by load_config: a value other than the default was chosen there
        default = next(f for f in dataclasses.fields(train) if f.name == "lr").default
        where = None if train.lr == default else "the experiment built in code"
    else:
        where = given.get("train.lr")
    # an explicit null is "the JSON's" (train.lr's documented None)
    if where is not None and train.lr is not None and train.lr != json_lr:
        raise ConfigError(f"{source}: key 'optimizer.params.lr': {json_lr!r}, but train.lr={train.lr!r} from "
                          f"{where}; give one of them (\"auto\" takes train.lr) or the same value in both")
    train.lr = float(json_lr)
    check = getattr(train, "check", None)
    if callable(check):  # the range train.lr is held to (e.g. below 1), as if it had been written there
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{source}: key 'optimizer.params.lr' (the run's train.lr): {err}") from None


def resolve_ds_config(cfg: Mapping[str, Any], micro_batch: int, grad_accum: int = 1,
                      lr: Optional[float] = None) -> dict[str, Any]:
    """Fill "auto" values and check the parts desmoe depends on."""
    cfg = copy.deepcopy(dict(cfg))
    source = cfg.pop("_source", "DeepSpeed config")
    check_top_level_keys(cfg, source)  # also for a dict not read by read_ds_config
    # The trainer feeds train.grad_accum micro-batches of train.micro_batch per optimizer step: a different
    # value here would change nothing the recipe feeds (micro batch) or make DeepSpeed step the optimizer
    # where the trainer does not count a step (accumulation: train.steps would silently mean micro-steps).
    for key, value, instead in (("train_micro_batch_size_per_gpu", micro_batch, "the experiment's train.micro_batch"),
                                ("gradient_accumulation_steps", grad_accum, "the experiment's train.grad_accum")):
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif _is_int(cfg[key]) and cfg[key] != value:  # a non-integer is named by _check_values
            raise ConfigError(f"{source}: key '{key}': expected \"auto\" or {value} ({instead}), got {cfg[key]!r}")
    if "scheduler" in cfg:  # DeepSpeed would step it after every step, overriding train.lr and the recipe's schedule
        raise ConfigError(f"{source}: key 'scheduler': not supported (the learning rate comes from train.lr and "
                          f"the recipe's schedule); remove it")
    if cfg.get("train_batch_size") == "auto":
        cfg.pop("train_batch_size")  # DeepSpeed derives it from the two values above
    if "bfloat16" in cfg:  # DeepSpeed's older name of the bf16 block, still read when "bf16" is absent
        if "bf16" in cfg:  # DeepSpeed would then ignore it without a word
            raise ConfigError(f"{source}: key 'bfloat16': expected only one of 'bf16' and its older name 'bfloat16'")
        cfg["bf16"] = cfg.pop("bfloat16")  # so that "auto" is resolved and the values checked as for bf16
    for precision in ("bf16", "fp16"):
        block = cfg.get(precision)
        if isinstance(block, dict) and block.get("enabled") == "auto":
            # Native bf16 only: torch's default also answers True on pre-Ampere GPUs, which emulate it (slowly).
            block["enabled"] = precision == "bf16" and use_cuda() and torch.cuda.is_bf16_supported(
                including_emulation=False)
    for key in ("fp16", "bf16", "zero_optimization", "optimizer"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"{source}: key '{key}': expected an object, got {cfg[key]!r}")
    if cfg.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{source}: key 'fp16.enabled': fp16 is not supported (use bf16)")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2):  # True == 1 in Python: DeepSpeed would run ZeRO-1
        raise ConfigError(f"{source}: key 'zero_optimization.stage': expected 0, 1 or 2 "
                          f"(DeepSpeed MoE does not support ZeRO-3), got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        block = cfg.get("zero_optimization", {}).get(key)
        if block is not None and (not isinstance(block, dict) or block.get("device", "none") != "none"):
            # ZeRO-Offload steps DeepSpeed's CPU Adam, not desmoe's optimizer that freezes experts exactly
            raise ConfigError(f"{source}: key 'zero_optimization.{key}': not supported (desmoe builds its own "
                              f"optimizer), got {block!r}")
    for key in ("cpu_offload", "cpu_offload_param"):  # DeepSpeed's older spelling of the two blocks above,
        value = cfg.get("zero_optimization", {}).get(key)  # still honoured (ZeRO-Offload tutorials use it)
        if value not in (None, False):
            raise ConfigError(f"{source}: key 'zero_optimization.{key}': not supported (desmoe builds its own "
                              f"optimizer), got {value!r}")
    opt = cfg.get("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{source}: key 'optimizer.type': expected AdamW, got {opt.get('type')!r}")
    for key in set(opt) - {"type", "params", "legacy_fusion"}:  # DeepSpeed ignores others: "param" lost the betas
        raise unknown_key(source, f"optimizer.{key}", ("type", "params"))
    if not isinstance(opt.get("params", {}), dict):  # else its items were named as unknown keys
        raise ConfigError(f"{source}: key 'optimizer.params': expected an object, got {opt['params']!r}")
    wd = opt.get("params", {}).get("weight_decay", 0)
    if (str(opt.get("type", "")).lower() == "adam" and opt.get("params", {}).get("adam_w_mode") is False
            and wd != 0):
        # DeepSpeed then builds Adam with L2 weight decay (folded into the gradient); desmoe's optimizer
        # decays decoupled (AdamW) only, which would train differently without a word
        raise ConfigError(f"{source}: key 'optimizer.params.adam_w_mode': expected true or unset (desmoe's "
                          f"optimizer is AdamW, decoupled weight decay), got false with weight_decay={wd!r}")
    unknown = set(opt.get("params", {})) - OPTIMIZER_KEYS
    if unknown:
        raise ConfigError(f"{source}: key 'optimizer.params.{sorted(unknown)[0]}': unknown "
                          f"(known: {', '.join(sorted(OPTIMIZER_KEYS))})")
    json_lr = opt.get("params", {}).get("lr", "auto")  # absent is "auto": train.lr
    if json_lr == "auto" and lr is not None:
        opt.setdefault("params", {})["lr"] = lr
    elif json_lr == "auto" and "lr" in opt.get("params", {}):  # absent and no train.lr: build_engine refuses
        raise ConfigError(f"{source}: key 'optimizer.params.lr': expected a number when train.lr is not set, "
                          f"got 'auto'")
    elif json_lr != "auto" and lr is not None and _is_num(json_lr, 0, open_low=True) and json_lr != lr:
        # fold_lr made them one value for a run; a caller that skipped it must not train at either silently
        raise ConfigError(f"{source}: key 'optimizer.params.lr': {json_lr!r} differs from train.lr={lr!r}; "
                          f"give one of them (\"auto\" takes train.lr) or the same value in both")
    cfg["optimizer"] = opt
    # Our optimizer is an AdamW subclass, which ZeRO does not list by type.
    cfg["zero_allow_untested_optimizer"] = True
    _check_values(cfg, source)
    check_blocks(cfg, source)  # after _check_values, whose messages name desmoe's own expectations
    return cfg


def _is_int(v: Any, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_num(v: Any, low: float = 0.0, open_low: bool = False) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if open_low else v >= low)


def _check_values(cfg: Mapping[str, Any], source: str) -> None:
    """Values DeepSpeed would assert on (or silently misread) become one line naming the key."""
    def bad(key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{source}: key '{key}': expected {expected}, got {value!r}")

    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "steps_per_print"):
        if key in cfg and not _is_int(cfg[key]):
            raise bad(key, "a positive integer", cfg[key])
    if "gradient_clipping" in cfg and not _is_num(cfg["gradient_clipping"]):
        raise bad("gradient_clipping", "a number >= 0", cfg["gradient_clipping"])
    for block in ("bf16", "fp16"):
        if "enabled" in cfg.get(block, {}) and not isinstance(cfg[block]["enabled"], bool):
            raise bad(f"{block}.enabled", 'true, false or "auto"', cfg[block]["enabled"])
    zero = cfg.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if key in zero and not (_is_int(zero[key]) or _is_num(zero[key], 0, open_low=True)):
            raise bad(f"zero_optimization.{key}", "a positive number", zero[key])
    for key in ("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions"):
        if key in zero and not isinstance(zero[key], bool):
            raise bad(f"zero_optimization.{key}", "true or false", zero[key])
    params = cfg["optimizer"].get("params", {})
    if not isinstance(params, dict):
        raise bad("optimizer.params", "an object", params)
    checks = {"lr": ("a number > 0", lambda v: _is_num(v, 0, open_low=True)),
              "eps": ("a number > 0", lambda v: _is_num(v, 0, open_low=True)),
              "weight_decay": ("a number >= 0", _is_num),
              "betas": ("two numbers in [0, 1)", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                        and all(_is_num(b) and b < 1 for b in v))}
    for key in ("torch_adam", "adam_w_mode"):  # a 0 or "false" passed the Adam/L2 check above as AdamW
        if key in params and not isinstance(params[key], bool):
            raise bad(f"optimizer.params.{key}", "true or false", params[key])
    for key, (expected, ok) in checks.items():
        # only lr has an "auto" (train.lr, filled above); any other "auto" would reach float() in build_engine
        if key in params and not ok(params[key]):
            raise bad(f"optimizer.params.{key}", expected, params[key])
    import torch.distributed as dist

    if "train_batch_size" in cfg and dist.is_available() and dist.is_initialized():
        world, micro, accum = dist.get_world_size(), cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
        if cfg["train_batch_size"] != micro * accum * world:
            raise bad("train_batch_size", f"micro batch x accumulation x ranks = {micro} x {accum} x {world} "
                      f"= {micro * accum * world} (or \"auto\")", cfg["train_batch_size"])


def build_engine(model: nn.Module, ds_config: Mapping[str, Any],
                 parts: Optional[Mapping[str, Callable[[str], bool]]] = None,
                 expert_unit: Optional[Callable[[int, int], Hashable]] = None):
    """Returns (engine, trainability).  ``parts`` names dense parameter sets that
    can be frozen on their own (e.g. {"router": lambda n: ".router." in n}).
    ``expert_unit(block, global expert id)``: experts with equal keys share one
    optimizer group and are frozen together (default: one group per expert)."""
    import deepspeed

    cfg = dict(ds_config)
    params = dict(cfg.pop("optimizer")["params"])
    if "lr" not in params:  # resolve_ds_config fills it from train.lr; a default here would be nobody's choice
        raise ConfigError("key 'optimizer.params.lr': expected a number when train.lr is not set, got nothing")
    params.pop("torch_adam", None)
    params.pop("adam_w_mode", None)
    wd = float(params.pop("weight_decay", 0.0))
    groups = build_param_groups(model, parts, weight_decay=wd, expert_unit=expert_unit)
    _check_group_count(len(groups))
    optimizer = FreezableAdamW(groups, lr=float(params["lr"]), betas=tuple(params.get("betas", (0.9, 0.999))),
                               eps=float(params.get("eps", 1e-8)), weight_decay=wd, foreach=False)
    _check_stage0_clipping(model, cfg)
    _frozen_groups_give_no_gradient(optimizer)  # before initialize: ZeRO then swaps the groups' params for its own
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    return engine, Trainability(optimizer)


_FROZEN_HOOKS: dict[int, tuple] = {}  # id(parameter) -> (weak reference to it, its hook's handle)


def _frozen_groups_give_no_gradient(optimizer: FreezableAdamW) -> None:
    """A parameter of a frozen group contributes a zero gradient, whatever computed it, so the norm that
    ``gradient_clipping`` divides by (ZeRO-1/2's, stage 0's, bf16's) is that of the groups that train.
    Frozen parameters are still differentiated where skipping them is not possible or not asked for: the
    experts of expert-parallel blocks (every rank must run the backward's all-to-all: DES-MoE's
    GradientSkipper) and every frozen group with ``skip_frozen_grads: false``; elsewhere they hold no
    gradient.  Counted, they made the clip, and every update, depend on ``model.ep_size``: a DES-MoE warm-up
    step (experts frozen) clipped by 2.70 at EP=2 and by 2.68 at EP=1, and a run resumed at the other EP
    size drifted by 1e-5 (docs/reliability.md).  ``FreezableAdamW`` never reads a frozen group's gradient,
    so nothing else changes.  A tensor hook runs before the gradient is accumulated and before any of
    DeepSpeed's reduction hooks.  It reads the flag at each backward, as freezing moves, and by index from
    the optimizer's current groups: loading a checkpoint replaces the group dicts (the flags with them)."""
    from functools import partial

    from desmoe.moe.trainability import FROZEN_KEY

    def unless_frozen(i: int, grad: torch.Tensor) -> Optional[torch.Tensor]:
        frozen = optimizer.param_groups[i].get(FROZEN_KEY, False)
        return torch.zeros_like(grad) if frozen else None  # None: the gradient as it is

    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.requires_grad:
                # one hook a parameter: an engine built again on the same model answers to its own optimizer's
                # flags only.  Kept here, not on the parameter: a handle there would make torch.save(model) fail
                ref, handle = _FROZEN_HOOKS.get(id(p), (None, None))
                if ref is not None and ref() is p:
                    handle.remove()
                _FROZEN_HOOKS[id(p)] = (weakref.ref(p), p.register_hook(partial(unless_frozen, i)))
    for key in [k for k, (ref, _) in _FROZEN_HOOKS.items() if ref() is None]:  # parameters gone since
        del _FROZEN_HOOKS[key]


def _check_stage0_clipping(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Without ZeRO, DeepSpeed's fp32 path clips by the mean over ranks of each rank's own gradient norm
    (``deepspeed.runtime.utils.clip_grad_norm_``); with experts spread over ranks those norms differ, and
    their mean is not the model's norm, so the clip would depend on model.ep_size.  ZeRO-1/2 take the norm
    over all ranks' groups."""
    from desmoe.moe.layer import moe_blocks

    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    ep = max((blk.ep_size for blk in moe_blocks(model)), default=1)
    if stage == 0 and float(cfg.get("gradient_clipping", 0.0) or 0.0) > 0 and ep > 1:
        raise ConfigError(f"key 'zero_optimization.stage': 0 with gradient_clipping={cfg['gradient_clipping']} and "
                          f"model.ep_size={ep} clips by a per-rank norm (DeepSpeed's stage 0); use stage 1 or 2, "
                          f"gradient_clipping 0, or model.ep_size 1")


def _check_group_count(n: int) -> None:
    """ZeRO runs one collective per optimizer group over all ranks: every rank needs as many
    groups, or the first step hangs.  Units that split unevenly over EP ranks break that."""
    from desmoe.collectives import all_reduce_

    t = all_reduce_(torch.tensor([n, -n], dtype=torch.int64), "max")
    if t[0] != -t[1]:
        raise ConfigError(f"expert units give this rank {n} optimizer groups but others between {-int(t[1])} and "
                          f"{int(t[0])}; ZeRO needs the same number on every rank (units that split evenly "
                          f"over the expert-parallel ranks, or the default one group per expert)")


def refresh_master_weights(engine, expert_tags) -> None:
    """After expert weights were written into the module (e.g. copied between slots), make a
    ZeRO-1/2 optimizer's fp32 master partitions of exactly those experts' groups (tags
    ``(block, global expert id)``) re-read them; every other group keeps its fp32 bits
    (DeepSpeed's ``refresh_fp32_params`` would round all of them to bf16 under bf16).
    A group holding several experts (an expert unit) is re-read only if all are named."""
    import deepspeed.comm as dist

    from desmoe.moe.trainability import EXPERT_KEY

    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        if hasattr(zero, "refresh_fp32_params"):
            zero.refresh_fp32_params()
        return  # no master copy: the module weights are what the optimizer steps
    tags = {tuple(t) for t in expert_tags}
    for i, group in enumerate(zero.optimizer.param_groups):
        members = {tuple(m) for m in group.get(EXPERT_KEY, ())}
        if members & tags and not members <= tags:  # the next step would put the old weights back, silently
            raise ValueError(f"refresh_master_weights: {sorted(members & tags)} written but their expert unit also "
                             f"holds {sorted(members - tags)[:4]}; a unit's master copy is re-read only whole")
        if members and members <= tags:
            part = dist.get_rank(group=zero.real_dp_process_group[i])
            zero.single_partition_of_fp32_groups[i].data.copy_(zero.parallel_partitioned_bit16_groups[i][part].data)
