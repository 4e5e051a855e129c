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


def test_a_key_sharing_a_resumable_prefix_is_still_checked(tmp_path):
    """"train.steps" may change; TRGE's train.steps_per_task may not (it moves every stage boundary
    under the checkpoint's step cursor: the resumed run retrained a finished task, then crashed)."""
    from desmoe.recipes.trge.recipe import TRGEExperiment, TRGERecipe

    run_dir, ckpt = _run_with_checkpoint(tmp_path, TRGEExperiment())
    changed = TRGEExperiment()
    changed.train.steps_per_task += 2
    with pytest.raises(UserError, match=r"train.steps_per_task \(100 -> 102\)"):
        checkpoint.check_resume_config(run_dir, ckpt, changed, TRGERecipe.resumable_keys)
    changed = TRGEExperiment()
    changed.train.eval_batch += 1  # "train.eval_" names a family of evaluation keys
    checkpoint.check_resume_config(run_dir, ckpt, changed, TRGERecipe.resumable_keys)


DS = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
      "bf16": {"enabled": False}, "zero_optimization": {"stage": 2, "overlap_comm": False},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}}}


def _with_ds_record(tmp_path, ds=DS, world=2):
    run_dir, ckpt = _run_with_checkpoint(tmp_path, Exp())
    checkpoint.write_text_atomic(run_dir / checkpoint.DS_RECORD, checkpoint.ds_record(ds, world))
    return run_dir, ckpt


def changed_ds(**edits):
    import copy

    ds = copy.deepcopy(DS)
    for dotted, value in edits.items():
        *path, last = dotted.split("__")
        node = ds
        for part in path:
            node = node[part]
        node[last] = value
    return ds


def test_deepspeed_settings_may_change_only_in_lr_and_speed(tmp_path):
    run_dir, ckpt = _with_ds_record(tmp_path)
    checkpoint.check_resume_deepspeed(run_dir, ckpt, DS, 2)
    checkpoint.check_resume_deepspeed(run_dir, ckpt, changed_ds(optimizer__params__lr=1e-4,
                                                                zero_optimization__overlap_comm=True), 2)
    for edits, world, named in [({"gradient_clipping": 0.0}, 2, "gradient_clipping (1.0 -> 0.0)"),
                                ({"bf16__enabled": True}, 2, "bf16.enabled (False -> True)"),
                                ({"zero_optimization__stage": 0}, 2, "zero_optimization.stage (2 -> 0)"),
                                ({"optimizer__params__weight_decay": 0.0}, 2, "optimizer.params.weight_decay"),
                                ({}, 4, "world_size (2 -> 4)")]:
        with pytest.raises(UserError) as err:
            checkpoint.check_resume_deepspeed(run_dir, ckpt, changed_ds(**edits), world)
        msg = str(err.value)
        assert "\n" not in msg and named in msg and checkpoint.DS_RECORD in msg, msg


def test_deepspeed_record_absent_or_damaged(tmp_path):
    run_dir, ckpt = _run_with_checkpoint(tmp_path, Exp())  # a run written before the record existed
    checkpoint.check_resume_deepspeed(run_dir, ckpt, changed_ds(gradient_clipping=0.0), 4)
    (run_dir / checkpoint.DS_RECORD).write_text("{not json")
    with pytest.raises(UserError, match="deepspeed.json: not valid JSON"):
        checkpoint.check_resume_deepspeed(run_dir, ckpt, DS, 2)


def test_a_moved_run_directory_resumes(tmp_path):
    """run.dir may change: a run moved to another disk is resumed where it now lies (its name may not)."""
    from desmoe.recipes.des_moe.recipe import DESMoEExperiment, DESMoERecipe

    run_dir, ckpt = _run_with_checkpoint(tmp_path, DESMoEExperiment())
    moved = DESMoEExperiment()
    moved.run.dir = "/elsewhere/runs"
    checkpoint.check_resume_config(run_dir, ckpt, moved, DESMoERecipe.resumable_keys)
    moved.run.name = "renamed"
    with pytest.raises(UserError, match=r"run.name \('desmoe' -> 'renamed'\)"):
        checkpoint.check_resume_config(run_dir, ckpt, moved, DESMoERecipe.resumable_keys)


def test_a_key_added_since_the_run_counts_as_its_default(tmp_path):
    """train.grad_accum came after some runs were saved: they resume while it keeps its default (1)."""
    import yaml

    from desmoe.recipes.des_moe.recipe import DESMoEExperiment, DESMoERecipe

    run_dir, ckpt = _run_with_checkpoint(tmp_path, DESMoEExperiment())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["train"]["grad_accum"]
    checkpoint.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(saved))
    checkpoint.check_resume_config(run_dir, ckpt, DESMoEExperiment(), DESMoERecipe.resumable_keys)
    changed = DESMoEExperiment()
    changed.train.grad_accum = 2
    with pytest.raises(UserError, match=r"train.grad_accum \(1 -> 2\)"):
        checkpoint.check_resume_config(run_dir, ckpt, changed, DESMoERecipe.resumable_keys)
