"""ZeRO++ keys act only under ZeRO-3 (refused by desmoe): under stage 0-2 DeepSpeed ignores them silently."""
import pytest

from desmoe.engine import resolve_ds_config
from desmoe.errors import ConfigError

BASE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("key, value", [("zero_quantized_weights", True), ("zero_quantized_gradients", True),
                                        ("zero_quantized_nontrainable_weights", True), ("zero_hpz_partition_size", 8)])
def test_zero_plus_plus_is_refused(stage, key, value):
    with pytest.raises(ConfigError) as err:
        resolve_ds_config({**BASE, "zero_optimization": {"stage": stage, key: value}}, 2, 1, lr=1e-3)
    assert str(err.value).startswith(f"DeepSpeed config: key 'zero_optimization.{key}': not supported (ZeRO++")
    assert str(err.value).endswith(f"got {value!r}")


def test_zero_plus_plus_off_passes():
    zero = {"stage": 2, "zero_quantized_weights": False, "zero_quantized_gradients": False, "zero_hpz_partition_size": 1}
    assert resolve_ds_config({**BASE, "zero_optimization": zero}, 2, 1, lr=1e-3)["zero_optimization"] == zero
