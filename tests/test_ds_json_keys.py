"""Top-level keys of a user's DeepSpeed JSON: each DeepSpeed 0.19 key is either honoured or refused in one
line before launch; a misspelled one (which DeepSpeed ignores silently) is refused with the key it resembles."""
import json

import pytest
from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS, DeepSpeedConfig

from desmoe.ds_keys import HONOURED, NOT_APPLIED
from desmoe.engine import read_ds_config, resolve_ds_config
from desmoe.errors import ConfigError

BASE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}


def _write(tmp_path, extra):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**BASE, **extra}))
    return path


def _keys_deepspeed_reads() -> set:
    """The top-level keys DeepSpeedConfig looks up (membership, [] or get) while reading a config."""
    seen: set = set()

    class Recording(dict):
        def __contains__(self, k):
            seen.add(k)
            return dict.__contains__(self, k)

        def __getitem__(self, k):
            seen.add(k)
            return dict.__getitem__(self, k)

        def get(self, k, default=None):
            seen.add(k)
            return dict.get(self, k, default)

    DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return {k for k in seen if isinstance(k, str)}


def test_every_key_deepspeed_reads_is_classified():
    # parity with this DeepSpeed: a key it reads that desmoe neither honours nor refuses would pass as unknown
    read = _keys_deepspeed_reads()
    assert read - HONOURED - set(NOT_APPLIED) - set(_REMOVED_TOP_LEVEL_CONFIG_KEYS) == set()
    # and no honoured key is one DeepSpeed ignores (these three are read through other lookups)
    assert HONOURED - read - {"optimizer", "scheduler", "flops_profiler"} == set()


@pytest.mark.parametrize("key", sorted(NOT_APPLIED))
def test_a_key_desmoe_does_not_apply_is_refused_in_one_line(tmp_path, key):
    path = _write(tmp_path, {key: {"enabled": True}})
    with pytest.raises(ConfigError) as err:
        read_ds_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: key '{key}': not supported (") and msg.endswith("; remove it")
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=f"key '{key}': not supported"):  # a dict built in code, too
        resolve_ds_config({**BASE, key: 1}, 2, 1, lr=1e-3)


@pytest.mark.parametrize("key, near", [("gradient_cliping", "gradient_clipping"), ("zero_optimisation", "zero_optimization"),
                                       ("bf_16", "bf16"), ("train_micro_batch_size", "train_micro_batch_size_per_gpu"),
                                       ("gradient_accumulation", "gradient_accumulation_steps")])
def test_a_misspelled_key_is_refused_with_the_key_it_resembles(tmp_path, key, near):
    path = _write(tmp_path, {key: 1})
    with pytest.raises(ConfigError) as err:
        read_ds_config(path)
    assert str(err.value) == (f"{path}: key '{key}': unknown (DeepSpeed would ignore it without a word); "
                              f"did you mean '{near}'?")


def test_the_honoured_keys_pass(tmp_path):
    extra = {"gradient_clipping": 1.0, "bf16": {"enabled": False}, "zero_optimization": {"stage": 2},
             "steps_per_print": 10, "wall_clock_breakdown": False, "memory_breakdown": False,
             "tensorboard": {"enabled": False}, "wandb": {"enabled": False}, "csv_monitor": {"enabled": False},
             "communication_data_type": "fp32", "prescale_gradients": False, "gradient_predivide_factor": 1.0,
             "zero_allow_untested_optimizer": True, "data_types": {"grad_accum_dtype": "fp32"}}
    cfg = resolve_ds_config(read_ds_config(_write(tmp_path, extra)), 2, 1, lr=1e-3)
    for key, value in extra.items():
        assert cfg[key] == value
