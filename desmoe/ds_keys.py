"""The top-level keys of a user's DeepSpeed JSON that desmoe's engine honours.

DeepSpeed reads the keys it knows and ignores any other without a word: a misspelled
``gradient_cliping`` trains unclipped, a ``seed`` seeds nothing.  Several keys it does know act
only on parts desmoe does not use (its pipeline engine, its dataloader, ``engine.compile()``,
models calling ``deepspeed.checkpointing``) or would change what desmoe counts on (AutoEP replacing
the model's MoE layers, sequence/tensor parallel dividing the world size).  Every such key is
refused here, before the model is built, in one line naming it.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

from desmoe.errors import ConfigError

# Applied by DeepSpeed exactly as written with desmoe's engine (or checked/resolved by desmoe.engine).
HONOURED = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "gradient_clipping", "bf16", "bfloat16", "fp16", "zero_optimization", "data_types",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "log_level",
    "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "timers",
    "checkpoint", "disable_allgather", "disable_python_gc",
})

# Keys DeepSpeed 0.19 knows (or users commonly write) that have no effect, or not the one meant,
# under desmoe: why, and what to use instead.
NOT_APPLIED = {
    "seed": "DeepSpeed has no seed key and would ignore it; the seed is set in the experiment config",
    "activation_checkpointing": "DeepSpeed applies it only to models that call deepspeed.checkpointing; "
                                "use train.activation_checkpointing in the experiment config",
    "pipeline": "applies only to DeepSpeed's PipelineModule, which desmoe does not use",
    "expert_parallel": "DeepSpeed's AutoEP would replace the model's MoE layers; desmoe sets expert "
                       "parallelism with model.ep_size in the experiment config",
    "moe": "DeepSpeed has no 'moe' block and would ignore it; experts are set in the experiment config (model.*)",
    "torch_autocast": "desmoe's models are not run under DeepSpeed's autocast; use bf16",
    "data_efficiency": "applies only to DeepSpeed's own dataloader, which desmoe does not use",
    "dataloader_drop_last": "applies only to DeepSpeed's own dataloader, which desmoe does not use",
    "compile": "applies only after engine.compile(), which desmoe does not call",
    "hybrid_engine": "DeepSpeed's RLHF hybrid engine is not used by desmoe",
    "autotuning": "applies only under DeepSpeed's autotuner, which desmoe does not run",
    "tensor_parallel": "tensor parallelism is not supported by desmoe",
    "sequence_parallel_size": "sequence parallelism is not supported by desmoe (DeepSpeed would divide "
                              "the world size by it)",
    "seq_parallel_communication_data_type": "sequence parallelism is not supported by desmoe",
    "weight_quantization": "weight quantization is not supported by desmoe",
    "managed_gradient_accumulation": "desmoe feeds train.grad_accum micro-batches itself",
    "gradient_allreduce_op": "desmoe's gradients are averaged over ranks; another reduction is not supported",
    "use_data_before_expert_parallelism": "desmoe uses DeepSpeed's default layout of expert-parallel ranks",
    "vocabulary_size": "read by DeepSpeed only for features desmoe does not use",
    "datastates_ckpt": "desmoe saves checkpoints with DeepSpeed's default checkpoint engine",
    "aio": "used only by NVMe offload, which desmoe does not support",
}


def check_top_level_keys(cfg: Mapping[str, Any], source: str) -> None:
    for key in cfg:
        if key in HONOURED or key == "_source":  # _source: read_ds_config's note of the file
            continue
        if key in NOT_APPLIED:
            raise ConfigError(f"{source}: key '{key}': not supported ({NOT_APPLIED[key]}); remove it")
        near = difflib.get_close_matches(str(key), sorted(HONOURED), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise unknown_key(source, key, hint=hint)


def unknown_key(source: str, key: str, known: Sequence[str] = (), hint: str = "") -> ConfigError:
    """The one-line refusal of a key DeepSpeed would read past: ``key`` dotted from the JSON's top."""
    listed = f"; known: {', '.join(known)}" if known else ""
    return ConfigError(f"{source}: key '{key}': unknown (DeepSpeed would ignore it without a word{listed}){hint}")


def check_block_keys(cfg: Mapping[str, Any], block: str, known: Sequence[str], source: str,
                     not_applied: Mapping[str, str] = {}) -> dict:  # noqa: B006 - read only
    """``cfg[block]`` (an object, or absent) whose keys DeepSpeed reads with dict.get: each known, else refused."""
    value = cfg.get(block, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: key '{block}': expected an object, got {value!r}")
    for key in value:
        if key in not_applied:
            raise ConfigError(f"{source}: key '{block}.{key}': not supported ({not_applied[key]}); remove it")
        if key not in known:
            raise unknown_key(source, f"{block}.{key}", known)
    return value


def check_blocks(cfg: Mapping[str, Any], source: str) -> None:
    """DeepSpeed validates its blocks (ZeRO, bf16/fp16, monitors) with pydantic inside deepspeed.initialize,
    after the model is built, with a multi-line traceback: a misspelled ``overlap_com`` or ``enabeld``.  The
    same models read here, before launch, make the first error one line naming the key."""
    import pydantic
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    from deepspeed.runtime.zero.config import get_zero_config

    for block, read in (("zero_optimization", get_zero_config), ("bf16", get_bfloat16_config),
                        ("fp16", get_float16_config), (None, get_monitor_config)):
        if block is not None and not isinstance(cfg.get(block, {}), dict):
            continue  # not an object: named by desmoe.engine (or DeepSpeed's older boolean ZeRO form)
        try:
            read(cfg)
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(part) for part in ((block,) if block else ()) + tuple(first["loc"]))
            what = ("unknown (DeepSpeed refuses it at launch)" if first["type"] == "extra_forbidden"
                    else f"{first['msg']}, got {first.get('input')!r}")
            raise ConfigError(f"{source}: key '{key}': {what}") from None
    check_checkpoint_block(cfg, source)
    check_data_types(cfg, source)
    check_reduction(cfg, source)
    check_zero_stage3_only(cfg, source)


# The 'checkpoint' block: DeepSpeed reads its keys with dict.get, so a misspelled one is ignored silently.
CHECKPOINT_HONOURED = frozenset({"tag_validation", "parallel_write", "checkpoint_serialization"})
CHECKPOINT_NOT_APPLIED = {
    "load_universal": "desmoe's checkpoints are not universal ones, and DeepSpeed would look for one on resume; "
                      "desmoe resumes at another world size itself (run.resume)",
    "use_node_local_storage": "desmoe's checkpoints and their resharding name ZeRO files by data-parallel rank",
    "writer": "desmoe saves through DeepSpeed's default checkpoint engine, whose files are complete when "
              "save_checkpoint returns (the run's atomic checkpoint directories count on it)",
}


def check_checkpoint_block(cfg: Mapping[str, Any], source: str) -> None:
    check_block_keys(cfg, "checkpoint", sorted(CHECKPOINT_HONOURED), source, CHECKPOINT_NOT_APPLIED)


DATA_TYPES_KEYS = ("grad_accum_dtype", "param_dtype", "buffer_dtype", "keep_in_fp32_modules")


def check_data_types(cfg: Mapping[str, Any], source: str) -> None:
    """DeepSpeed reads 'data_types' with dict.get (a misspelled key is ignored) and rejects a dtype name, or a
    mix it cannot run, only inside deepspeed.initialize with a traceback."""
    from deepspeed.runtime.config import DtypeEnum

    block = check_block_keys(cfg, "data_types", DATA_TYPES_KEYS, source)
    dtypes = {}
    for key in ("grad_accum_dtype", "param_dtype", "buffer_dtype"):
        value = block.get(key)
        if value is None:
            continue
        try:
            dtypes[key] = DtypeEnum(value).value
        except ValueError:
            raise ConfigError(f"{source}: key 'data_types.{key}': expected \"fp32\", \"bf16\" or \"fp16\", "
                              f"got {value!r}") from None
    import torch

    model = torch.bfloat16 if cfg.get("bf16", {}).get("enabled") else torch.float32
    if "param_dtype" in dtypes and dtypes["param_dtype"] != model:  # DeepSpeed asserts so in initialize
        raise ConfigError(f"{source}: key 'data_types.param_dtype': expected the dtype bf16.enabled gives "
                          f"({model}), got {block['param_dtype']!r}")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    accum = dtypes.get("grad_accum_dtype", model)
    if stage == 0 and accum != model:  # DeepSpeed: NotImplementedError "unsupported mix" in initialize
        raise ConfigError(f"{source}: key 'data_types.grad_accum_dtype': expected the model's dtype ({model}) "
                          f"without ZeRO (zero_optimization.stage 0), got {block['grad_accum_dtype']!r}")
    if stage == 1 and model == torch.bfloat16 and accum == torch.float32:
        # DeepSpeed then runs its BF16_Optimizer, not ZeRO-1: desmoe.engine.refresh_master_weights would re-read
        # every group's fp32 master copy from bf16 weights, not only the experts written (DES-MoE's copies)
        raise ConfigError(f"{source}: key 'data_types.grad_accum_dtype': {block['grad_accum_dtype']!r} with bf16 "
                          f"and zero_optimization.stage 1 makes DeepSpeed run its BF16_Optimizer instead of "
                          f"ZeRO-1; use stage 2, or leave grad_accum_dtype unset")


def check_reduction(cfg: Mapping[str, Any], source: str) -> None:
    """The gradient-reduction keys: values DeepSpeed rejects only inside deepspeed.initialize (a ValueError, or
    ZeRO-2's asserts with reduce_scatter), or misreads (a "false" string is a true prescale_gradients)."""
    comm = cfg.get("communication_data_type")
    if comm is not None and (not isinstance(comm, str) or comm.lower() not in ("fp32", "fp16", "bf16")):
        raise ConfigError(f"{source}: key 'communication_data_type': expected \"fp32\", \"bf16\" or \"fp16\", got {comm!r}")
    prescale = cfg.get("prescale_gradients", False)
    if not isinstance(prescale, bool):
        raise ConfigError(f"{source}: key 'prescale_gradients': expected true or false, got {prescale!r}")
    factor = cfg.get("gradient_predivide_factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ConfigError(f"{source}: key 'gradient_predivide_factor': expected a number > 0, got {factor!r}")
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage", 0) == 2 and zero.get("reduce_scatter", True):
        if factor != 1.0:
            raise ConfigError(f"{source}: key 'gradient_predivide_factor': expected 1.0 with ZeRO-2 and reduce_scatter "
                              f"(DeepSpeed supports no other), got {factor!r}")
        if prescale:
            raise ConfigError(f"{source}: key 'prescale_gradients': expected false with ZeRO-2 and reduce_scatter "
                              f"(DeepSpeed supports no other), got true")


def check_zero_stage3_only(cfg: Mapping[str, Any], source: str) -> None:
    """ZeRO++ (quantized weights/gradients, hierarchical partitioning) acts only under ZeRO-3, which desmoe
    refuses; under stage 0-2 DeepSpeed ignores those keys without a word and the run communicates in full
    precision, unlike what the user asked for."""
    zero = cfg.get("zero_optimization", {})
    asked = {key: zero[key] for key in ("zero_quantized_weights", "zero_quantized_gradients",
                                        "zero_quantized_nontrainable_weights") if zero.get(key)}
    if zero.get("zero_hpz_partition_size", 1) not in (1, None):
        asked["zero_hpz_partition_size"] = zero["zero_hpz_partition_size"]
    if asked:
        key, value = next(iter(asked.items()))
        raise ConfigError(f"{source}: key 'zero_optimization.{key}': not supported (ZeRO++ acts only under ZeRO-3, "
                          f"which desmoe does not support; DeepSpeed would ignore it), got {value!r}")
