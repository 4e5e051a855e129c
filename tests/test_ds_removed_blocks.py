"""DeepSpeed's check of the config blocks it removed is private: desmoe reads it before the process groups,
and stops in one line when a DeepSpeed lacks it rather than letting those blocks through."""
import json

import deepspeed
import pytest
from deepspeed.runtime import config as ds_config
from deepspeed.runtime.zero import config as zero_config

from desmoe.engine import _removed_keys_check, read_ds_config
from desmoe.errors import ConfigError, UserError


def test_this_deepspeed_check_is_used(tmp_path):
    assert _removed_keys_check(ds_config) is ds_config._reject_removed_config_keys
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "elasticity": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"ds.json: Elastic training has been removed"):
        read_ds_config(path)


def test_a_deepspeed_module_without_the_check_stops_in_one_line():
    # a real DeepSpeed module that lacks the name, as a DeepSpeed before 0.19.7 (or after a rename) would
    with pytest.raises(UserError) as err:
        _removed_keys_check(zero_config)
    assert str(err.value) == (f"deepspeed {deepspeed.__version__}: deepspeed.runtime.zero.config."
                              f"_reject_removed_config_keys not found, which desmoe refuses DeepSpeed's removed "
                              f"config blocks with; install the DeepSpeed of constraints.txt (deepspeed>=0.19.7,<0.20)")
    assert "\n" not in str(err.value)
