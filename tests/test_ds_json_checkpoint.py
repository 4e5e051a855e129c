"""The DeepSpeed JSON's 'checkpoint' block: DeepSpeed reads it with dict.get (a misspelled key is ignored), and
load_universal / use_node_local_storage / writer change how desmoe's checkpoints are written or found."""
import pytest

from desmoe.engine import resolve_ds_config
from desmoe.errors import ConfigError

BASE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}


@pytest.mark.parametrize("key, value", [("load_universal", True), ("use_node_local_storage", True),
                                        ("writer", {"type": "fast"})])
def test_checkpoint_keys_that_change_desmoes_checkpoints_are_refused(key, value):
    with pytest.raises(ConfigError) as err:
        resolve_ds_config({**BASE, "checkpoint": {key: value}}, 2, 1, lr=1e-3)
    assert str(err.value).startswith(f"DeepSpeed config: key 'checkpoint.{key}': not supported (")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["tag_validaton", "load_universal_checkpoint", "serialization"])
def test_a_misspelled_checkpoint_key_is_refused(key):
    with pytest.raises(ConfigError, match=rf"key 'checkpoint\.{key}': unknown \(DeepSpeed would ignore it"):
        resolve_ds_config({**BASE, "checkpoint": {key: "Fail"}}, 2, 1, lr=1e-3)


def test_the_checkpoint_keys_desmoe_honours_pass():
    block = {"tag_validation": "Fail", "parallel_write": {"pipeline_stage": False}, "checkpoint_serialization": True}
    assert resolve_ds_config({**BASE, "checkpoint": block}, 2, 1, lr=1e-3)["checkpoint"] == block


def test_checkpoint_not_an_object_is_refused():
    with pytest.raises(ConfigError, match=r"key 'checkpoint': expected an object, got 'Fail'"):
        resolve_ds_config({**BASE, "checkpoint": "Fail"}, 2, 1, lr=1e-3)
