"""Values in a user's DeepSpeed JSON that Python reads as another (a 0 for false, true for 1) are refused in one
line rather than trained as something the user did not write."""
import pytest

from desmoe.engine import resolve_ds_config
from desmoe.errors import ConfigError

BASE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}


@pytest.mark.parametrize("key", ["adam_w_mode", "torch_adam"])
@pytest.mark.parametrize("value", [0, 1, "false", "true", None])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_adam_flags_must_be_booleans(key, value, kind):
    # {"type": "Adam", "adam_w_mode": 0, "weight_decay": 0.1} asks for L2 Adam; desmoe's AdamW would have run
    opt = {"type": kind, "params": {"lr": "auto", "weight_decay": 0.1, key: value}}
    with pytest.raises(ConfigError) as err:
        resolve_ds_config({**BASE, "optimizer": opt}, 2, 1, lr=1e-3)
    assert str(err.value) == f"DeepSpeed config: key 'optimizer.params.{key}': expected true or false, got {value!r}"


@pytest.mark.parametrize("flag", [True, False])
def test_adam_flags_as_booleans_pass(flag):
    opt = {"type": "AdamW", "params": {"lr": "auto", "torch_adam": flag, "adam_w_mode": flag}}
    assert resolve_ds_config({**BASE, "optimizer": opt}, 2, 1, lr=1e-3)["optimizer"]["params"]["torch_adam"] is flag


@pytest.mark.parametrize("stage", [True, False])
def test_zero_stage_as_a_boolean_is_refused(stage):
    # True == 1 and False == 0 in Python: "stage": true passed the 0/1/2 check and DeepSpeed ran ZeRO-1
    with pytest.raises(ConfigError) as err:
        resolve_ds_config({**BASE, "zero_optimization": {"stage": stage}}, 2, 1, lr=1e-3)
    assert str(err.value).startswith("DeepSpeed config: key 'zero_optimization.stage': expected 0, 1 or 2")
    assert str(err.value).endswith(f"got {stage!r}")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_pass(stage):
    assert resolve_ds_config({**BASE, "zero_optimization": {"stage": stage}}, 2, 1, lr=1e-3)["zero_optimization"]["stage"] == stage
