"""Experiment configs: YAML + dotted overrides, validated with the key named."""
import pytest

from desmoe.config import load_config, split_overrides
from desmoe.engine import read_ds_config, resolve_ds_config
from desmoe.errors import ConfigError
from desmoe.recipes.lm.recipe import LMExperiment


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  num_experts: 4\n  ep_size: 2\ntrain:\n  steps: 10\n")
    cfg = load_config(LMExperiment, path, split_overrides(["train.lr=3e-4", "--model.top_k", "1",
                                                           "--model.capacity_factor=null"]))
    assert (cfg.model.num_experts, cfg.model.ep_size, cfg.train.steps) == (4, 2, 10)
    assert cfg.train.lr == 3e-4 and cfg.model.top_k == 1 and cfg.model.capacity_factor is None


@pytest.mark.parametrize("text,overrides,message", [
    ("model:\n  num_expert: 4\n", [], "unknown key 'model.num_expert'"),
    ("train:\n  steps: ten\n", [], "key 'train.steps': expected an integer, got 'ten'"),
    ("model:\n  num_experts: 6\n  ep_size: 4\n", [], "key 'model.ep_size': expected a divisor of num_experts=6"),
    ("", ["model.expert_type=relu"], "key 'model.expert_type': expected one of 'swiglu', 'mlp'"),
    ("", ["train.seq_len=512"], "key 'train.seq_len': expected at most model.max_seq_len"),
    ("", ["run.resume=maybe"], "key 'run.resume': expected true or false"),
    ("model: [1, 2]\n", [], "key 'model': expected a mapping"),
    ("model:\n  top_k: 2\n   bad_indent: 1\n", [], "not valid YAML (line 3)"),
    ("- 1\n- 2\n", [], "expected a mapping at the top level"),
])
def test_bad_input_names_the_key(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(LMExperiment, path, overrides)
    assert message in str(err.value)
    assert str(err.value).startswith(str(path)) or "override" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(LMExperiment, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected the form key.path=value"):
        split_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="'train' is not a section"):
        load_config(LMExperiment, None, ["train=3", "train.steps=4"])


def test_deepspeed_json_checks(tmp_path):
    good = read_ds_config("configs/zero2.json")
    cfg = resolve_ds_config(good, micro_batch=4, lr=1e-3)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["optimizer"]["params"]["lr"] == 1e-3
    assert cfg["bf16"]["enabled"] in (True, False)
    broken = write(tmp_path, '{"zero_optimization": {"stage": 2,}}', "ds.json")
    with pytest.raises(ConfigError, match=r"ds.json: not valid JSON \(line 1"):
        read_ds_config(broken)
    z3 = write(tmp_path, '{"zero_optimization": {"stage": 3}}', "z3.json")
    with pytest.raises(ConfigError, match="zero_optimization.stage.*ZeRO-3"):
        resolve_ds_config(read_ds_config(z3), micro_batch=1)
    sgd = write(tmp_path, '{"optimizer": {"type": "SGD", "params": {}}}', "sgd.json")
    with pytest.raises(ConfigError, match="optimizer.type': expected AdamW"):
        resolve_ds_config(read_ds_config(sgd), micro_batch=1)


@pytest.mark.parametrize("overrides, refused", [
    # an HF base brings its own expert count (checked against ep_size when it loads): model.num_experts' default
    # of 8 must not decide, e.g. ep_size 16 for DeepSeek-V2-Lite's 64 experts
    (["base.hf=some/hf-model", "model.ep_size=16"], None),
    (["base.hf=some/hf-model", "model.ep_size=0"], "key 'model.ep_size': expected a positive integer, got 0"),
    # desmoe's own model: its architecture is checked whole, keys named under model.*
    (["model.ep_size=16"], "key 'model.ep_size': expected a divisor of num_experts=8, got 16"),
    (["model.num_experts=16", "model.ep_size=16"], None),
    (["model.hidden_size=96", "model.num_heads=5"], "key 'model.num_heads': expected a divisor of hidden_size=96"),
])
def test_desmoe_model_keys_checked_against_the_base(overrides, refused):
    from desmoe.recipes.des_moe.config import DESMoEExperiment

    if refused is None:
        assert load_config(DESMoEExperiment, None, overrides).model.ep_size == 16
    else:
        with pytest.raises(ConfigError, match=refused.replace("(", r"\(").replace(")", r"\)")):
            load_config(DESMoEExperiment, None, overrides)
