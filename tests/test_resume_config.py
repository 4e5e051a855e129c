"""Resuming a run with a changed experiment config is refused in one line (nothing mixed)."""
from dataclasses import dataclass, field

import pytest

from desmoe import checkpoint
from desmoe.config import dump_yaml
from desmoe.errors import UserError


@dataclass
class Train:
    steps: int = 10
    lr: float = 1e-3
    micro_batch: int = 8


@dataclass
class Model:
    hidden_size: int = 64


@dataclass
class Exp:
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)


def _run_with_checkpoint(tmp_path, cfg):
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    (ckpt / checkpoint.tag_for(5)).mkdir(parents=True)
    checkpoint.write_text_atomic(ckpt / checkpoint.LATEST, checkpoint.tag_for(5))
    checkpoint.write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    return run_dir, ckpt


def test_same_config_and_resumable_keys_pass(tmp_path):
    run_dir, ckpt = _run_with_checkpoint(tmp_path, Exp())
    checkpoint.check_resume_config(run_dir, ckpt, Exp())
    checkpoint.check_resume_config(run_dir, ckpt, Exp(train=Train(steps=20, lr=1e-4)))  # longer, lower lr: allowed


def test_changed_config_is_named(tmp_path):
    run_dir, ckpt = _run_with_checkpoint(tmp_path, Exp())
    with pytest.raises(UserError) as err:
        checkpoint.check_resume_config(run_dir, ckpt, Exp(model=Model(hidden_size=128), train=Train(micro_batch=4)))
    msg = str(err.value)
    assert "\n" not in msg and "model.hidden_size (64 -> 128)" in msg and "train.micro_batch (8 -> 4)" in msg and "run.name" in msg


def test_fresh_run_is_not_checked(tmp_path):
    checkpoint.write_text_atomic(tmp_path / "config.yaml", dump_yaml(Exp()))
    checkpoint.check_resume_config(tmp_path, tmp_path / "checkpoints", Exp(model=Model(hidden_size=8)))


def test_keep_checkpoints_may_change_and_be_absent_in_older_runs(tmp_path):
    import yaml

    from desmoe.recipes.trge.recipe import TRGEExperiment

    run_dir, ckpt = _run_with_checkpoint(tmp_path, TRGEExperiment())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["run"]["keep_checkpoints"]  # a run saved before the key existed
    checkpoint.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(saved))
    changed = TRGEExperiment()
    changed.run.keep_checkpoints = 5
    checkpoint.check_resume_config(run_dir, ckpt, changed)
    changed.train.micro_batch = 4  # still refused for a key that matters
    with pytest.raises(UserError, match="train.micro_batch"):
        checkpoint.check_resume_config(run_dir, ckpt, changed)
