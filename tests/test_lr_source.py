"""Where the learning rate comes from: the DeepSpeed JSON's ``optimizer.params.lr`` is never dropped.

"auto" (the shipped JSONs) or absent: train.lr.  A number, train.lr not set by the user: the number is the
run's train.lr (config dump, logs, schedules).  A number and a different train.lr the user set: refused in
one line naming both and where train.lr came from.  In process, but one run on 2 real ranks.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from desmoe.config import dump_yaml, load_config
from desmoe.engine import fold_lr, read_ds_config, resolve_ds_config
from desmoe.errors import ConfigError
from desmoe.recipes.des_moe.recipe import DESMoEExperiment
from desmoe.recipes.lm.pretrain import PretrainExperiment
from desmoe.recipes.lm.recipe import LMExperiment, TrainConfig
from desmoe.recipes.trge.recipe import TRGEExperiment

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = [LMExperiment, PretrainExperiment, DESMoEExperiment, TRGEExperiment]


def ds_file(tmp: Path, lr) -> Path:
    params = {"weight_decay": 0.1} if lr is None else {"lr": lr, "weight_decay": 0.1}
    path = tmp / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": params}}))
    return path


def engine_lr(cfg, raw) -> float:
    """The lr build_engine gives the optimizer: what resolve_ds_config leaves in the JSON."""
    return resolve_ds_config(raw, cfg.train.micro_batch, lr=cfg.train.lr)["optimizer"]["params"]["lr"]


def test_shipped_deepspeed_jsons_take_train_lr():
    shipped = sorted(ROOT.glob("configs/**/*.json"))
    assert shipped
    for path in shipped:
        params = json.loads(path.read_text()).get("optimizer", {}).get("params", {})
        assert params.get("lr", "auto") == "auto", path


@pytest.mark.parametrize("cls", EXPERIMENTS, ids=lambda c: c.__name__)
def test_json_number_is_the_lr_when_train_lr_is_not_set(cls, tmp_path):
    cfg, raw = load_config(cls, None, []), read_ds_config(ds_file(tmp_path, 5e-4))
    assert cfg.train.lr != 5e-4  # the recipe's default, which the JSON's number replaces
    fold_lr(cfg, raw)
    assert cfg.train.lr == 5e-4
    assert "lr: 0.0005" in dump_yaml(cfg)  # the config the run writes and shows in TensorBoard
    assert engine_lr(cfg, raw) == 5e-4


@pytest.mark.parametrize("cls", EXPERIMENTS, ids=lambda c: c.__name__)
def test_auto_or_absent_is_train_lr(cls, tmp_path):
    for lr in ("auto", None):
        default = load_config(cls, None, [])
        raw = read_ds_config(ds_file(tmp_path, lr))
        fold_lr(default, raw)
        assert engine_lr(default, raw) == type(default)().train.lr  # the recipe's default
        given = load_config(cls, None, ["train.lr=0.007"])
        fold_lr(given, raw)
        assert given.train.lr == 0.007 and engine_lr(given, raw) == 0.007


def test_different_train_lr_is_refused_in_one_line(tmp_path):
    json_path = ds_file(tmp_path, 5e-4)
    raw = read_ds_config(json_path)
    cfg = load_config(LMExperiment, ROOT / "configs/smoke.yaml")  # train.lr: 0.002
    with pytest.raises(ConfigError) as err:
        fold_lr(cfg, raw)
    line = str(err.value)
    assert line.startswith(f"{json_path}: key 'optimizer.params.lr': 0.0005, but train.lr=0.002 from ")
    assert str(ROOT / "configs/smoke.yaml") in line and "\n" not in line
    cfg = load_config(TRGEExperiment, ROOT / "configs/trge_digits.yaml", ["train.lr=0.01"])
    with pytest.raises(ConfigError, match=r"train.lr=0.01 from override 'train.lr=0.01'"):
        fold_lr(cfg, raw)
    in_code = LMExperiment(train=TrainConfig(lr=0.01))  # not built by load_config: a value off the default is a choice
    with pytest.raises(ConfigError, match="from the experiment built in code"):
        fold_lr(in_code, raw)
    with pytest.raises(ConfigError, match=r"0.0005 differs from train.lr=0.002"):  # a caller that skipped fold_lr
        resolve_ds_config(raw, 1, lr=0.002)


def test_equal_values_and_explicit_null_are_fine(tmp_path):
    raw = read_ds_config(ds_file(tmp_path, 2e-3))
    for overrides in (["train.lr=0.002"], ["train.lr=null"]):  # null: "the JSON's number"
        cfg = load_config(LMExperiment, None, overrides)
        fold_lr(cfg, raw)
        assert cfg.train.lr == 2e-3 and engine_lr(cfg, raw) == 2e-3


def test_json_number_held_to_train_lr_range(tmp_path):
    json_path = ds_file(tmp_path, 2)
    with pytest.raises(ConfigError) as err:
        fold_lr(load_config(TRGEExperiment, None, []), read_ds_config(json_path))
    assert str(err.value).startswith(f"{json_path}: key 'optimizer.params.lr' (the run's train.lr): ")
    assert "expected a number in (0, 1), got 2.0" in str(err.value)


def _lm_run(run_dir: str, ds: str):
    """A 2-step smoke run with no train.lr anywhere: the JSON's number must be what it trains at."""
    from desmoe.recipes.lm.recipe import SmokeRecipe
    from desmoe.training.trainer import Trainer

    cfg = load_config(LMExperiment, None, [
        "model.hidden_size=32", "model.ffn_size=32", "train.seq_len=32", "data.max_bytes=300000", "train.steps=2",
        "train.micro_batch=2", "train.log_every=1", "train.eval_every=100", "train.save_every=100",
        f"run.dir={run_dir}", "run.name=lr"])
    trainer = Trainer(SmokeRecipe(cfg), ds)
    trainer.run()
    return sorted({g["lr"] for g in trainer.trainability.optimizer.param_groups})


def test_run_trains_and_records_the_json_lr(ranks, tmp_path):
    ds = ROOT / "configs/zero2.json"
    mine = json.loads(ds.read_text())
    mine["optimizer"]["params"]["lr"] = 5e-4
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(mine))
    assert ranks.run(_lm_run, str(tmp_path), str(path)) == [[5e-4]] * 2
    import yaml

    assert yaml.safe_load((tmp_path / "lr" / "config.yaml").read_text())["train"]["lr"] == 5e-4
    logged = [json.loads(line) for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/lr"] for r in logged if "train/lr" in r] == [5e-4, 5e-4]
