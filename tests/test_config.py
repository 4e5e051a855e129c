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


@pytest.mark.parametrize("overrides, refused", [
    # a checkpoint brings its experts and positions: ep_size and seq_len are checked once it loads, not against
    # model.num_experts' and model.max_seq_len's defaults (8, 512)
    (["init.kind=checkpoint", "init.path=ckpt", "model.ep_size=16", "train.seq_len=2048"], None),
    (["init.kind=upcycle", "init.path=dense", "model.ep_size=16"], None),
    (["init.kind=checkpoint", "init.path=ckpt", "model.ep_size=0"], "key 'model.ep_size': expected a positive"),
    # a scratch model's architecture is checked whole, keys named under model.*
    (["model.ep_size=16"], "key 'model.ep_size': expected a divisor of num_experts=8, got 16"),
    (["train.seq_len=2048"], "key 'train.seq_len': expected below model.max_seq_len=512"),
    # Mixtral and OLMoE have no dense layers or shared expert: a width for them would be lost
    (["model.arch=mixtral", "model.shared_ffn=512"], "key 'model.shared_ffn': expected unset with arch=mixtral"),
    (["model.arch=olmoe", "model.first_dense_layers=0"], "key 'model.first_dense_layers': expected unset with"),
])
def test_pretrain_model_keys_checked_against_the_init(overrides, refused):
    from desmoe.recipes.lm.pretrain import PretrainExperiment

    if refused is None:
        assert load_config(PretrainExperiment, None, overrides).model.ep_size == 16
    else:
        with pytest.raises(ConfigError, match=refused):
            load_config(PretrainExperiment, None, overrides)


SPECS = {  # one spec per architecture, every field unlike its default where the architecture has it
    "deepseek_v2": dict(hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=2, num_experts=6, top_k=3,
                        expert_ffn=32, shared_ffn=64, dense_ffn=96, first_dense_layers=2),
    "qwen2_moe": dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=6, top_k=3,
                      expert_ffn=32, shared_ffn=48, dense_ffn=96, first_dense_layers=2),
    "mixtral": dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=6, top_k=3, expert_ffn=32),
    "olmoe": dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=6, top_k=3, expert_ffn=32),
}


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_spec_of_inverts_hf_config(arch):
    """What a checkpoint is compared with: every field hf_config writes reads back as it was."""
    from dataclasses import asdict

    from desmoe.models.hf_build import MoEModelSpec, hf_config, spec_of

    spec = MoEModelSpec(arch=arch, max_seq_len=300, rope_theta=5e5, init_std=0.01, tie_embeddings=False,
                        **SPECS[arch])
    spec.check()
    got = spec_of(hf_config(spec, vocab_size=100))
    want = {k: v for k, v in asdict(spec).items() if k not in ("ep_size", "seed")}
    if arch in ("mixtral", "olmoe"):  # they have none of these
        want = {k: v for k, v in want.items() if k not in ("shared_ffn", "dense_ffn", "first_dense_layers")}
    assert got == want


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_model_keys_that_contradict_the_checkpoint_are_refused(arch):
    """init.kind=checkpoint|upcycle trains the checkpoint's architecture: a model.* key set to something else
    would be ignored without a word (model.top_k=1 trained top-2)."""
    from desmoe.models.hf_build import MoEModelSpec, hf_config
    from desmoe.recipes.lm.pretrain import PretrainModelSpec, check_against

    config = hf_config(MoEModelSpec(arch=arch, **SPECS[arch]), vocab_size=100)
    check_against(PretrainModelSpec(**SPECS[arch], arch=arch, ep_size=3, seed=5), config, "checkpoint", "ck")
    check_against(PretrainModelSpec(top_k=2, ep_size=2), config, "checkpoint", "ck")  # the default: unset
    with pytest.raises(ConfigError, match=r"key 'model.top_k': expected unset or 3, the value in the "
                       rf"init.kind=checkpoint model \(ck, a {arch}; its architecture applies\), got 1"):
        check_against(PretrainModelSpec(top_k=1), config, "checkpoint", "ck")
    with pytest.raises(ConfigError, match="key 'model.arch'"):
        check_against(PretrainModelSpec(arch="olmoe" if arch != "olmoe" else "mixtral"), config, "upcycle", "ck")
    if arch in ("mixtral", "olmoe"):
        with pytest.raises(ConfigError, match="key 'model.dense_ffn': expected unset: no counterpart"):
            check_against(PretrainModelSpec(dense_ffn=128), config, "checkpoint", "ck")


@pytest.mark.parametrize("text,message", [
    # a second block appended to a config replaced the first whole: steps/batch fell back to the defaults
    ("train:\n  steps: 10\n  micro_batch: 2\nmodel:\n  top_k: 1\ntrain:\n  lr: 3.0e-4\n",
     "key 'train' given twice (lines 1 and 6)"),
    ("train:\n  steps: 10\n  steps: 20\n", "key 'steps' given twice (lines 2 and 3)"),
    ("train: {steps: 10, steps: 20}\n", "key 'steps' given twice (lines 1 and 1)"),
])
def test_duplicate_yaml_key_is_refused(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(LMExperiment, path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


def test_merge_key_may_override_what_it_brings(tmp_path):
    """``<<: *anchor`` then a key of its own is YAML's way to override, not a duplicate."""
    path = write(tmp_path, "model: &m {num_experts: 4, ep_size: 2}\ntrain: {steps: 10}\n")
    assert load_config(LMExperiment, path).model.num_experts == 4
    from desmoe.config import _UniqueKeyLoader
    import yaml

    assert yaml.load("a: &x {p: 1, q: 2}\nb: {<<: *x, q: 3}\n", Loader=_UniqueKeyLoader)["b"] == {"p": 1, "q": 3}


def test_mapping_override_sets_only_its_keys():
    """desmoe.schedule={t1: 0.3, t2: 0.8} replaced the section: the shipped config's warmup: fig1 became the
    default eq11 without a word.  A mapping given to a section now sets those keys, as t1=/t2= would."""
    from desmoe.recipes.des_moe.config import DESMoEExperiment

    cfg = load_config(DESMoEExperiment, "configs/desmoe_6dom.yaml", ["desmoe.schedule={t1: 0.3, t2: 0.8}",
                                                                     "desmoe={dges: {phi: 0.5}}"])
    assert (cfg.desmoe.schedule.t1, cfg.desmoe.schedule.t2, cfg.desmoe.schedule.warmup) == (0.3, 0.8, "fig1")
    assert (cfg.desmoe.dges.phi, cfg.desmoe.dges.update_every, cfg.desmoe.alr.tau) == (0.5, 100, 0.7)
    assert cfg.train.steps == 3000
    with pytest.raises(ConfigError, match="override 'train={lr: 1e-3, lr: 2e-3}': key 'lr' given twice"):
        load_config(LMExperiment, None, ["train={lr: 1e-3, lr: 2e-3}"])


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, expected a YAML config file"):
        load_config(LMExperiment, tmp_path)
    with pytest.raises(ConfigError, match="is a directory, expected a DeepSpeed JSON file"):
        read_ds_config(tmp_path)


def test_override_that_yaml_would_cut_or_null_is_refused():
    """`run.dir='/data/exp #3'` (quoted for the shell) ran in /data/exp: YAML took ' #3' for a comment.
    `desmoe.dges=null` (meant as "no DGES") ran DGES at the default settings, the file's dropped."""
    from desmoe.recipes.des_moe.config import DESMoEExperiment

    with pytest.raises(ConfigError, match=r"override 'run.dir=/data/exp #3': YAML reads what follows '#' as a comment"):
        load_config(LMExperiment, None, ["run.dir=/data/exp #3"])
    assert load_config(LMExperiment, None, ["run.dir=/data/exp#3", "run.name='a #1'"]).run.name == "a #1"
    with pytest.raises(ConfigError, match=r"override 'desmoe.dges=null': 'desmoe.dges' is a section, not a value"):
        load_config(DESMoEExperiment, "configs/desmoe_6dom.yaml", ["desmoe.dges=null"])
    assert load_config(LMExperiment, None, ["model.capacity_factor=null"]).model.capacity_factor is None


@pytest.mark.parametrize("value", ["010", "1:30"])
def test_integer_spellings_yaml_1_1_reads_otherwise_are_refused(tmp_path, value):
    """YAML 1.1 reads 010 as octal 8 and 1:30 as base-60 90: train.steps=010 ran 8 steps without a word."""
    with pytest.raises(ConfigError, match=f"key 'train.steps': expected an integer, got '{value}'"):
        load_config(LMExperiment, None, [f"train.steps={value}"])
    with pytest.raises(ConfigError, match=f"key 'train.steps': expected an integer, got '{value}'"):
        load_config(LMExperiment, write(tmp_path, f"train:\n  steps: {value}\n"))
    assert load_config(LMExperiment, None, ["train.steps=1_000", "train.seed=0"]).train.steps == 1000


def test_bfloat16_block_older_name_is_resolved_as_bf16(tmp_path):
    """DeepSpeed still reads "bfloat16" when "bf16" is absent; its "auto" reached DeepSpeed unresolved."""
    path = write(tmp_path, '{"bfloat16": {"enabled": "auto"}}', "ds.json")
    cfg = resolve_ds_config(read_ds_config(path), micro_batch=1, lr=1e-3)
    assert "bfloat16" not in cfg and cfg["bf16"]["enabled"] in (True, False)


def test_end_of_options_marker_is_not_an_override():
    """`launcher/x.py --config c.yaml -- train.steps=3` read '--' as a key named '' and joined the next argument."""
    assert split_overrides(["--", "train.steps=3", "--train.lr", "0.1"]) == ["train.steps=3", "train.lr=0.1"]


@pytest.mark.parametrize("name", ["", "/scratch/x", "../other"])
def test_run_name_stays_inside_run_dir(name):
    with pytest.raises(ConfigError, match=r"key 'run.name': expected a non-empty folder name inside run.dir"):
        load_config(LMExperiment, None, [f"run.name={name}"])
    assert load_config(LMExperiment, None, ["run.name=group/a b"]).run.name == "group/a b"


@pytest.mark.parametrize("block", ["curriculum_learning", "amp", "sparse_attention"])
def test_deepspeed_blocks_deepspeed_removed_are_one_line_before_the_run(tmp_path, block):
    """DeepSpeed 0.19 refuses them only inside deepspeed.initialize, after the model is built, as a traceback."""
    path = write(tmp_path, f'{{"{block}": {{"enabled": false}}}}', "ds.json")
    with pytest.raises(ConfigError, match="ds.json: .*has been removed") as err:
        read_ds_config(path)
    assert "\n" not in str(err.value)
