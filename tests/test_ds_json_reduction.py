"""Gradient-reduction keys of a user's DeepSpeed JSON: values DeepSpeed rejects only inside deepspeed.initialize
(with a traceback) or misreads are refused in one line before launch; the ones it runs pass."""
import pytest

from desmoe.engine import resolve_ds_config
from desmoe.errors import ConfigError

BASE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}


def resolve(**extra):
    return resolve_ds_config({**BASE, **extra}, 2, 1, lr=1e-3)


@pytest.mark.parametrize("value", ["fp64", "float32", 32, True])
def test_communication_data_type_deepspeed_cannot_read(value):
    with pytest.raises(ConfigError, match=r"key 'communication_data_type': expected \"fp32\", \"bf16\" or \"fp16\""):
        resolve(communication_data_type=value)


@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_prescale_gradients_must_be_a_boolean(value):
    # DeepSpeed tests its truth: "false" would prescale
    with pytest.raises(ConfigError, match=r"key 'prescale_gradients': expected true or false"):
        resolve(prescale_gradients=value, zero_optimization={"stage": 0})


@pytest.mark.parametrize("value", [0, -1.0, "2", True])
def test_gradient_predivide_factor_must_be_positive(value):
    with pytest.raises(ConfigError, match=r"key 'gradient_predivide_factor': expected a number > 0"):
        resolve(gradient_predivide_factor=value, zero_optimization={"stage": 0})


def test_zero2_reduce_scatter_keeps_the_default_scaling():
    # DeepSpeed asserts both in ZeRO-2's constructor when reduce_scatter is on (its default)
    with pytest.raises(ConfigError, match=r"key 'gradient_predivide_factor': expected 1.0 with ZeRO-2"):
        resolve(gradient_predivide_factor=2.0, zero_optimization={"stage": 2})
    with pytest.raises(ConfigError, match=r"key 'prescale_gradients': expected false with ZeRO-2"):
        resolve(prescale_gradients=True, zero_optimization={"stage": 2, "reduce_scatter": True})


@pytest.mark.parametrize("extra", [
    {"communication_data_type": "FP32", "zero_optimization": {"stage": 2}},
    {"prescale_gradients": True, "gradient_predivide_factor": 2.0, "zero_optimization": {"stage": 1}},
    {"prescale_gradients": True, "zero_optimization": {"stage": 2, "reduce_scatter": False}},
    {"gradient_predivide_factor": 1, "zero_optimization": {"stage": 2}}])
def test_reduction_settings_deepspeed_runs_pass(extra):
    assert resolve(**extra)["zero_optimization"] == extra["zero_optimization"]
