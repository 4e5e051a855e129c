"""TRGE's gradient accumulation (``train.grad_accum``) on 2 real ranks (EP=2, ZeRO-2), on the small real digit
sequence: every step of 2 micro-batches of 4 samples trains as one micro-batch of the same 8 samples does --
the same logged losses and gradient norms step by step, the same final groups and gates, the same
task-identifier inputs -- and an accumulating run stopped inside a task continues exactly (the shared pool's too: its route counts so far are
summed over ranks in the checkpoint, which keeps rank 0's client state only).  Two paths: the tiny CLIP (random crops
cut into rows, adapters inside the transformer towers, TRGE's group routers) and the tiny dual encoder
(cached CNN features, BERT text tower with dropout in training, the shared pool's router and its route
counts, which decide what freezes after each task)."""
import json
import math

import pytest

from test_trge_run import digits_cached  # noqa: F401  (the digit data, once per module)

STEPS, BIG = 3, 8  # steps per task (3 tasks), samples a step on each rank
# fp32: a step's gradient is summed in two parts instead of one, so values agree to a few roundings, and AdamW
# carries that through the steps (its update is a ratio, not a sum): 100 x fp32's epsilon, relative
RTOL = 100 * 1.2e-7
PARAM_RTOL = 1e-2  # of how far training moved a tensor (see the test)
CASES = {"clip": ("trge", ["backbone.kind=tiny_clip", "backbone.hidden_size=32"]),
         "dual": ("shared_pool", ["backbone.kind=tiny_dual", "backbone.hidden_size=16", "train.feature_cache=",
                                  "train.cache_image_features=true", "groups.pool_freeze_per_task=1"])}


def accum_case(run_dir, case, micro_batch, accum, extra=()):
    import torch

    from desmoe.config import load_config
    from desmoe.moe.layer import moe_blocks
    from desmoe.recipes.trge.recipe import TRGEExperiment, TRGERecipe
    from desmoe.training.trainer import Trainer

    method, options = CASES[case]
    cfg = load_config(TRGEExperiment, "configs/trge_digits.yaml", [
        f"method={method}", f"run.dir={run_dir}", f"run.name={case}{accum}", "groups.bottleneck=8",
        f"train.steps_per_task={STEPS}", f"train.micro_batch={micro_batch}", f"train.grad_accum={accum}",
        "train.warmup=1", "train.log_every=1", "train.save_every=2", "run.keep_checkpoints=0",
        "train.eval_batch=64", "train.proto_samples=32", "data.n_train=48", "data.n_test=16", *options, *extra])
    class Recipe(TRGERecipe):
        def on_engine(self, trainer):  # the groups as initialised: how far training moved them
            self.initial = [[p.detach().clone() for p in b.parameters()] for b in moe_blocks(self.model)]
            self.norms = []

        def end_step(self, t, step):  # the step's summed gradient (before clipping): its scale, which AdamW hides
            super().end_step(t, step)
            self.norms.append(float(trainer.engine.get_global_grad_norm()))

    recipe = Recipe(cfg)
    trainer = Trainer(recipe, "configs/zero2.json")
    trainer.run()
    blocks = moe_blocks(recipe.model)
    return {"global_steps": trainer.engine.global_steps, "initial": recipe.initial, "norms": recipe.norms,
            "params": [[p.detach().clone() for p in b.parameters()] for b in blocks],
            "identifier": [i.feats.tolist() for i in recipe.identifier.infos],
            "pool_frozen": recipe.baseline.frozen_state(), "matrix": recipe.progress["rows"],
            # the whole module and the recipe's record, for test_trge_recompute.py
            "state": {n: t.detach().clone() for n, t in [*recipe.model.named_parameters(),
                                                         *recipe.model.named_buffers()]},
            "progress": {k: v for k, v in recipe.progress.items() if k not in ("seconds", "timing")},
            "wrapped": sum(getattr(m, "_desmoe_recompute", False) for m in recipe.model.modules())}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [r["train/loss"] for r in _rows(run_dir) if "train/loss" in r]


@pytest.mark.parametrize("case", CASES)
def test_accumulated_trge_step_equals_one_big_batch_and_resumes(ranks, tmp_path, case):
    one = ranks.run(accum_case, str(tmp_path), case, BIG, 1)
    two = ranks.run(accum_case, str(tmp_path), case, BIG // 2, 2)
    assert one[0]["global_steps"] == two[0]["global_steps"] == 3 * STEPS  # optimizer steps, not micro-steps
    a, b = _losses(tmp_path / f"{case}1"), _losses(tmp_path / f"{case}2")
    assert len(a) == len(b) == len(one[0]["norms"]) == 3 * STEPS
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert math.isclose(x, y, rel_tol=RTOL), (step, x, y, a, b)
    for step, (x, y) in enumerate(zip(one[0]["norms"], two[0]["norms"]), 1):  # a sum, not a mean, would double
        assert math.isclose(x, y, rel_tol=RTOL), (step, x, y)
    for r1, r2 in zip(one, two):  # both ranks: each holds its own expert-parallel share of the groups
        assert r1["identifier"] == r2["identifier"] and r1["pool_frozen"] == r2["pool_frozen"]
        for b0, b1, b2 in zip(r1["initial"], r1["params"], r2["params"]):
            for p0, p1, p2 in zip(b0, b1, b2):
                # AdamW divides each gradient by its own size, so an element whose gradient is a cancelling
                # sum (the text tower's: every class prompt against the same images) carries its rounding
                # into the update at full scale: measured up to 8.4e-4 of how far training moved a tensor
                # (1e-7 with the arithmetic in fp64: the fp32 rounding, not another computation)
                assert (p1 - p2).norm() <= PARAM_RTOL * (p1 - p0).norm(), (case, (p1 - p2).norm(), (p1 - p0).norm())
    if case == "dual":  # the shared pool froze one expert per block after each task, the same in both
        assert r1["pool_frozen"] and all(len(f) == 3 for f in r1["pool_frozen"])

    # stopped inside task 2 (its checkpoint after step 2 of 3 the latest, as after a preemption there): the
    # resumed accumulating run redoes the rest and ends exactly where the uninterrupted one ended
    run = tmp_path / f"{case}2"
    before = _rows(run)
    (run / "checkpoints" / "latest").write_text("step00000005")
    again = ranks.run(accum_case, str(tmp_path), case, BIG // 2, 2)
    assert _strip(_rows(run)) == _strip(before) and any(r["step"] > 5 and "train/loss" in r for r in before)
    for r1, r2 in zip(two, again):
        assert r1["identifier"] == r2["identifier"] and r1["matrix"] == r2["matrix"]
        assert r1["pool_frozen"] == r2["pool_frozen"]
        for b1, b2 in zip(r1["params"], r2["params"]):
            assert all((p1 == p2).all() for p1, p2 in zip(b1, b2))


def _strip(rows):
    """The logged values a resume must reproduce (times differ)."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
