"""The DeepSpeed JSON's 'data_types' block: a misspelled key (DeepSpeed reads it with dict.get, ignoring it), a
dtype name or a mix DeepSpeed rejects only inside deepspeed.initialize, and stage 1 + bf16 + fp32 accumulation
(DeepSpeed swaps ZeRO-1 for its BF16_Optimizer) are refused in one line before launch."""
import pytest

from desmoe.engine import resolve_ds_config
from desmoe.errors import ConfigError

BASE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}


def resolve(**extra):
    return resolve_ds_config({**BASE, **extra}, 2, 1, lr=1e-3)


@pytest.mark.parametrize("key", ["grad_accum_type", "gradient_accumulation_dtype", "param_type"])
def test_a_misspelled_data_types_key_is_refused(key):
    with pytest.raises(ConfigError, match=rf"key 'data_types\.{key}': unknown \(DeepSpeed would ignore it"):
        resolve(data_types={key: "fp32"}, zero_optimization={"stage": 2})


@pytest.mark.parametrize("key", ["grad_accum_dtype", "param_dtype", "buffer_dtype"])
def test_a_dtype_deepspeed_cannot_read_is_refused(key):
    with pytest.raises(ConfigError) as err:
        resolve(data_types={key: "float64"}, zero_optimization={"stage": 2})
    assert str(err.value) == f"DeepSpeed config: key 'data_types.{key}': expected \"fp32\", \"bf16\" or \"fp16\", got 'float64'"


@pytest.mark.parametrize("bf16, accum", [(False, "bf16"), (False, "fp16"), (True, "fp32"), (True, "fp16")])
def test_without_zero_an_accumulation_dtype_unlike_the_model_is_refused(bf16, accum):
    # DeepSpeed: NotImplementedError("unsupported mix of model_dtype=... and grad_accum_dtype=...") in initialize
    with pytest.raises(ConfigError, match=r"key 'data_types\.grad_accum_dtype': expected the model's dtype"):
        resolve(bf16={"enabled": bf16}, data_types={"grad_accum_dtype": accum}, zero_optimization={"stage": 0})


def test_param_dtype_unlike_the_precision_is_refused():
    with pytest.raises(ConfigError, match=r"key 'data_types\.param_dtype': expected the dtype bf16.enabled gives"):
        resolve(bf16={"enabled": False}, data_types={"param_dtype": "bf16"}, zero_optimization={"stage": 2})


def test_stage1_bf16_fp32_accumulation_is_refused():
    with pytest.raises(ConfigError, match=r"BF16_Optimizer instead of ZeRO-1; use stage 2"):
        resolve(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"}, zero_optimization={"stage": 1})


@pytest.mark.parametrize("stage, bf16, block", [
    (2, True, {"grad_accum_dtype": "fp32"}), (2, False, {"grad_accum_dtype": "fp32", "param_dtype": "fp32"}),
    (0, False, {"grad_accum_dtype": "fp32"}), (0, True, {"grad_accum_dtype": "bf16", "param_dtype": "bf16"}),
    (1, True, {"grad_accum_dtype": "bf16"}), (2, True, {"keep_in_fp32_modules": []}), (1, False, {})])
def test_the_data_types_deepspeed_runs_as_asked_pass(stage, bf16, block):
    cfg = resolve(bf16={"enabled": bf16}, data_types=block, zero_optimization={"stage": stage})
    assert cfg["data_types"] == block
