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


@pytest.mark.parametrize("extra, key, what", [
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "zero_optimization.overlap_com", "unknown"),
    ({"zero_optimization": {"stage": 2, "round_robin_gradient": True}}, "zero_optimization.round_robin_gradient", "unknown"),
    ({"bf16": {"enabeld": True}}, "bf16.enabeld", "unknown"),
    ({"bfloat16": {"enabled": False, "immediate_grad_updat": True}}, "bf16.immediate_grad_updat", "unknown"),
    ({"fp16": {"enabled": False, "loss_scal": 0}}, "fp16.loss_scal", "unknown"),
    ({"fp16": {"enabled": False, "initial_scale_power": "high"}}, "fp16.initial_scale_power", "Input should be a valid integer"),
    ({"tensorboard": {"enabled": True, "output_pth": "tb"}}, "tensorboard.output_pth", "unknown"),
    ({"csv_monitor": {"enabled": True, "job": "x"}}, "csv_monitor.job", "unknown"),
    ({"wandb": {"enabled": True, "projet": "x"}}, "wandb.projet", "unknown"),
])
def test_a_misspelled_key_inside_a_deepspeed_block_is_refused_before_launch(extra, key, what):
    # DeepSpeed refuses these too, but inside deepspeed.initialize after the model is built, with a traceback
    with pytest.raises(ConfigError) as err:
        resolve_ds_config({**BASE, **extra}, 2, 1, lr=1e-3)
    assert str(err.value).startswith(f"DeepSpeed config: key '{key}': {what}")
    assert "\n" not in str(err.value)


def test_deepspeeds_blocks_as_written_pass():
    extra = {"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 5e8, "round_robin_gradients": True},
             "bf16": {"enabled": False, "immediate_grad_update": True}, "fp16": {"enabled": False, "loss_scale": 0,
             "initial_scale_power": 16}, "tensorboard": {"enabled": False, "output_path": "tb", "job_name": "j"}}
    cfg = resolve_ds_config({**BASE, **extra}, 2, 1, lr=1e-3)
    assert cfg["zero_optimization"]["round_robin_gradients"] is True and cfg["fp16"]["initial_scale_power"] == 16


@pytest.mark.parametrize("key", ["param", "parameters", "betas", "lr"])
def test_an_unknown_key_of_the_optimizer_block_is_refused(key):
    # {"type": "AdamW", "parameters": {"betas": [0.9, 0.95]}}: DeepSpeed and desmoe read only "params", so the
    # run trained with the default betas (0.9, 0.999)
    opt = {"type": "AdamW", key: {"lr": 1e-3, "betas": [0.9, 0.95]}}
    with pytest.raises(ConfigError) as err:
        resolve_ds_config({**BASE, "optimizer": opt}, 2, 1, lr=1e-3)
    assert str(err.value) == (f"DeepSpeed config: key 'optimizer.{key}': unknown (DeepSpeed would ignore it without "
                              f"a word; known: type, params)")
