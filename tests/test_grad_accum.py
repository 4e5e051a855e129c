"""Gradient accumulation (``train.grad_accum``) on 2 real ranks: a step of 2 micro-batches of 4 samples trains
as one micro-batch of the same 8 samples does -- the same logged losses, step by step, and for DES-MoE the
same domain-expert matrix.  The DES-MoE case gives its halves unequal numbers of counted labels (instruction
data), so the step's task loss must be the mean over all its counted labels, not the mean of the two means."""
import copy
import json
import math
from pathlib import Path

import pytest

from test_trainer import DS, _config

STEPS, BIG = 4, 8
# fp32: the step's gradient is summed in two parts instead of one, so values agree to a few roundings, and
# AdamW carries that through the steps (its update is a ratio, not a sum): 100 x fp32's epsilon, relative
RTOL = 100 * 1.2e-7


def halves(recipe_cls):
    """The recipe, with each step's samples drawn once as one batch of BIG rows and cut into its micro-batches."""

    class Halves(recipe_cls):
        def batch(self, index):  # LM: the index-th micro-batch of the run
            t = self.cfg.train
            parts = BIG // t.micro_batch
            step, micro = divmod(index, parts)
            full = self.big_batch(step)
            return full[micro * t.micro_batch:(micro + 1) * t.micro_batch]

        def big_batch(self, step):
            from desmoe.data.text_corpus import sample_windows

            t = self.cfg.train
            return sample_windows(self.train_data, BIG, t.seq_len + 1, t.seed, step, self.trainer.rank)

        def attach(self, trainer, state):
            super().attach(trainer, state)
            if hasattr(self, "streams"):  # DES-MoE: its streams, drawn at BIG rows and cut
                from desmoe.recipes.des_moe.streams import DomainStreams

                big = copy.deepcopy(self.cfg)
                big.train.micro_batch, big.train.grad_accum = BIG, 1
                self.streams = Cut(DomainStreams(self.data, big, trainer.rank, trainer.world, trainer.start),
                                   self.cfg.train.micro_batch)

    return Halves


class Cut:
    """Micro-batches of ``rows`` cut from a stream of BIG-row batches; response masks of unequal sizes."""

    def __init__(self, inner, rows):
        self.inner, self.rows, self.mixed, self.pending = inner, rows, inner.mixed, []

    def next(self, domain):
        import torch

        from desmoe.data.packing import DomainBatch

        if not self.pending:
            b = self.inner.next(domain)
            mask = torch.ones_like(b.input_ids, dtype=torch.bool)
            t = mask.shape[1]
            for r in range(BIG):  # row r counts its last labels only: 1/8 of the row up to all of it
                mask[r, : t - t * (r + 1) // BIG] = False
            self.pending = [DomainBatch(b.input_ids[i:i + self.rows], b.domain[i:i + self.rows],
                                        b.token_domain[i:i + self.rows], b.step, mask[i:i + self.rows])
                            for i in range(0, BIG, self.rows)]
        return self.pending.pop(0)


def accum_case(kind: str, run_dir: str, name: str, micro_batch: int, accum: int):
    import importlib

    from desmoe.training.trainer import Trainer

    module, cls = {"lm": "desmoe.recipes.lm.recipe:SmokeRecipe",
                   "desmoe": "desmoe.recipes.des_moe.recipe:DESMoERecipe"}[kind].split(":")
    cfg = _config(kind, run_dir, name)
    cfg.train.steps, cfg.train.micro_batch, cfg.train.grad_accum = STEPS, micro_batch, accum
    cfg.train.eval_every = 100
    cfg.train.aux_loss_coef = 0.0  # load balancing is not a mean over samples: 2 x 4 rows differ from 8 rows
    if kind == "desmoe":
        cfg.desmoe.schedule.t1 = 0.5  # T1 = 2, T2 = 3: warm-up (one step a domain), stabilise, consolidate
    recipe = halves(getattr(importlib.import_module(module), cls))(cfg)
    trainer = Trainer(recipe, DS)
    trainer.run()
    out = {"global_steps": trainer.engine.global_steps}
    if kind == "desmoe":
        out["M"] = recipe.method.dmap.M.tolist()
        out["A"] = recipe.method.dmap.A.tolist()
    return out


def _losses(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.mark.parametrize("kind,key", [("lm", "train/loss"), ("desmoe", "train/task_loss")])
def test_accumulated_step_equals_one_big_micro_batch(ranks, tmp_path, kind, key):
    one = ranks.run(accum_case, kind, str(tmp_path), "one", BIG, 1)[0]
    two = ranks.run(accum_case, kind, str(tmp_path), "two", BIG // 2, 2)[0]
    assert one["global_steps"] == two["global_steps"] == STEPS  # optimizer steps, not micro-steps
    a, b = _losses(tmp_path / "one", key), _losses(tmp_path / "two", key)
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert math.isclose(x, y, rel_tol=RTOL), (step, x, y, a, b)
    if kind == "desmoe":
        assert one["M"] == two["M"] and one["A"] == two["A"]
        assert len(set(_losses(tmp_path / "one", "train/phase"))) > 1  # the run crossed a phase boundary


def test_grad_accum_is_checked_against_the_deepspeed_config(tmp_path):
    from desmoe.engine import read_ds_config, resolve_ds_config
    from desmoe.errors import ConfigError

    path = tmp_path / "ds.json"
    path.write_text('{"gradient_accumulation_steps": 4}')
    assert resolve_ds_config(read_ds_config(path), micro_batch=2, grad_accum=4)["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match="gradient_accumulation_steps': expected \"auto\" or 2 \\(the "
                       "experiment's train.grad_accum\\), got 4"):
        resolve_ds_config(read_ds_config(path), micro_batch=2, grad_accum=2)


def resume_case(kind: str, run_dir: str, name: str):
    import importlib

    from desmoe.training.trainer import Trainer
    from test_trainer import RECIPES

    module, cls = RECIPES[kind].split(":")
    cfg = _config(kind, run_dir, name)
    cfg.train.steps, cfg.train.grad_accum, cfg.train.save_every, cfg.train.eval_every = STEPS, 2, 2, 100
    if kind == "desmoe":
        cfg.desmoe.schedule.t1 = 0.5
    Trainer(getattr(importlib.import_module(module), cls)(cfg), DS).run()


@pytest.mark.parametrize("kind", ["pretrain", "desmoe"])
def test_accumulating_run_resumes_exactly(ranks, tmp_path, kind):
    """The data streams are positioned in micro-batches: a resumed run draws what the uninterrupted one drew."""
    from test_trainer import _logged

    ranks.run(resume_case, kind, str(tmp_path), "full")
    ranks.run(resume_case, kind, str(tmp_path), "resumed")
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step00000002")  # as if it had died after step 2
    ranks.run(resume_case, kind, str(tmp_path), "resumed")
    full, resumed = _logged(tmp_path / "full"), _logged(tmp_path / "resumed")
    assert any(step > 2 for step, _ in full) and full == resumed
