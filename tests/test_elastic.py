"""Elastic resume (desmoe/reshard.py): a run saved on 2 ranks (EP=2) resumes on 1 rank with twice the
accumulation (the same global batch), and one saved on 1 rank resumes on 2 (EP=2), for the smoke job,
pretraining and DES-MoE (also with labels counted unequally between micro-batches, as instruction data
counts its responses; and resumed inside the warm-up, whose frozen experts get gradients at EP=2 only, which
the clipping norm must leave out: desmoe/engine.py).  Right after the load, every parameter's fp32 master
weight and Adam moments, collected through DeepSpeed's own accessors, equal the saved run's bit for bit; the
logged losses then follow an uninterrupted run of the saved world size (a step's gradient is summed in
another order: 100 fp32 epsilons, relative, as in test_grad_accum.py) and DES-MoE's domain-expert matrices
end equal."""
import json
import math
import re
from pathlib import Path

import pytest

from test_grad_accum import RTOL
from test_trainer import DS, RECIPES, _config

FIRST, MORE = 3, 2  # steps before the resume, and after it


def first_steps(kind: str) -> int:
    """Steps before the resume: inside DES-MoE's warm-up, after its first step, where Adam's second step turned
    the warm-up's different clip (2.70 at EP=2 vs 2.68 at EP=1, before the fix) into a drift of 1e-5 to 3e-5;
    resumed after step 3 the same defect moved the loss by 4e-7 only, within RTOL."""
    return 1 if kind.endswith("+warmup") else FIRST


def full_state(engine) -> dict:
    """Every optimizer parameter's (fp32 master, exp_avg, exp_avg_sq), whole, keyed by name with its global
    expert id instead of the local index: cut from each rank's flat partitions where DeepSpeed's own
    fragment map (``_hp_mapping``) says and summed over the parameter's data-parallel group (collective)."""
    import deepspeed.comm as dist
    import torch

    from desmoe.moe.trainability import EXPERT_KEY

    zero, out = engine.optimizer, {}
    for i, group in enumerate(zero.bit16_groups):
        flat = zero.single_partition_of_fp32_groups[i]
        state = zero.optimizer.state.get(flat, {})
        tags = zero.optimizer.param_groups[i].get(EXPERT_KEY)
        for p in group:
            name = engine.param_names[p]
            if tags:
                name = re.sub(r"deepspeed_experts\.\d+\.", f"expert{tags[0][1]}.", name)
            whole = []
            for source in (flat, state.get("exp_avg"), state.get("exp_avg_sq")):
                buf = torch.zeros(p.numel(), dtype=torch.float32)
                if source is not None and p._hp_mapping is not None:
                    lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.get_hp_fragment_address()
                    buf.narrow(0, lp.start, lp.numel).copy_(source.detach().narrow(0, hp.start, hp.numel))
                dist.all_reduce(buf, group=p._dp_group)
                whole.append(buf)
            out[name] = whole
    return out


def run(kind: str, run_dir: str, name: str, accum: int, ep: int):
    """A run of FIRST + MORE steps saving after ``first_steps`` (or its resume); returns what the engine holds
    after that step and right after a load."""
    import importlib

    from desmoe.training.trainer import Trainer

    first = first_steps(kind)
    kind, variant = (kind.split("+") + [""])[:2]
    masked = variant == "masked"
    module, cls = RECIPES[kind].split(":")
    cfg = _config(kind, run_dir, name)
    cfg.train.steps, cfg.train.grad_accum, cfg.model.ep_size = FIRST + MORE, accum, ep
    cfg.train.save_every, cfg.train.eval_every = first, 100
    cfg.train.micro_batch = 4  # a global batch of 8 samples on 2 ranks x 1 and on 1 rank x 2
    if kind == "desmoe" and variant == "warmup":  # T1 = 4: steps 2-4 after the resume warm up, with gradient
        cfg.desmoe.schedule.t1, cfg.desmoe.schedule.t2 = 0.8, 1.0  # norms above the clip (1.0)
    elif kind == "desmoe":
        cfg.desmoe.schedule.t1 = 0.4  # T1 = 2 (one step a domain), T2 = 3: the resume falls in the last phase
    seen = {}

    class Watched(getattr(importlib.import_module(module), cls)):
        def attach(self, trainer, state):
            super().attach(trainer, state)
            if masked:  # like instruction data: a micro-batch counts the labels of its even tokens, a number
                plain = self.streams.next  # that differs between micro-batches (reshard.label_scales)

                def next_masked(domain):
                    batch = plain(domain)
                    batch.loss_mask = batch.input_ids % 2 == 0
                    return batch

                self.streams.next = next_masked
            seen["loaded"] = full_state(trainer.engine) if state else None
            seen["loaded_steps"] = trainer.engine.global_steps

        def end_step(self, stage, step):
            super().end_step(stage, step)
            if step + 1 == first:  # what the checkpoint of step first holds
                seen["saved"] = full_state(self.trainer.engine)

        def finish(self, trainer):
            super().finish(trainer)
            if kind == "desmoe" and hasattr(self.method, "dmap"):  # DES-MoE itself (the baselines keep no A/M)
                seen["M"], seen["A"] = self.method.dmap.M.tolist(), self.method.dmap.A.tolist()

    # bf16: DeepSpeed's bf16 engine, the GPU's path (on a CPU the config's "auto" is fp32); the test wrote it
    Trainer(Watched(cfg), str(Path(run_dir) / "zero2_bf16.json") if variant == "bf16" else DS).run()
    return seen


def _merged(per_rank: list[dict], key: str) -> dict:
    out = {}
    for seen in per_rank:
        out.update(seen[key])
    return out


def _losses(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


_one: list = []  # the module's 1-rank pool, restarted after a test broke it (as conftest's ranks fixture does)


@pytest.fixture
def one_rank():
    from rankpool import RankPool

    if _one and not _one[0].healthy:
        _one.pop().close()
    if not _one:
        _one.append(RankPool(1))
    yield _one[0]


def teardown_module():
    while _one:
        _one.pop().close()


@pytest.mark.parametrize("kind,key,saved_world", [(kind, "train/loss", world) for kind in
                                                   ("lm", "pretrain", "desmoe", "desmoe+masked", "desmoe+warmup",
                                                    "desmoe+bf16")
                                                   for world in (2, 1)])
def test_resume_at_another_world_size_continues_the_run(ranks, one_rank, tmp_path, kind, key, saved_world):
    """+bf16 (the GPU's engine; it found the bf16 files' other name, bf16_zero_pp_rank_*, which every elastic
    resume of a bf16 run failed on): the saved fp32 master weights and moments are loaded bit for bit as in fp32,
    and the first step after the resume (the same weights, the same micro-batches) keeps the fp32 bound.  Its
    update then differs: a step's gradient sum over 2 micro-batches is rounded to bf16 on one rank and not across
    2, so later losses come from bf16 weights that may differ by one bf16 rounding each; they are held to one
    bf16 unit roundoff (2**-8), relative (measured: about 1e-5)."""
    if kind.endswith("+bf16"):
        cfg = json.loads(Path(DS).read_text())
        cfg["bf16"] = {"enabled": True}
        (tmp_path / "zero2_bf16.json").write_text(json.dumps(cfg))
    pools = {2: (ranks, 1, 2), 1: (one_rank, 2, 1)}  # world -> (pool, grad_accum, ep_size)
    (saved, accum, ep), (other, accum2, ep2) = pools[saved_world], pools[3 - saved_world]
    first = first_steps(kind)
    full = saved.run(run, kind, str(tmp_path), "run", accum, ep)  # uninterrupted, saving after step first
    uninterrupted = _losses(tmp_path / "run", key)
    (tmp_path / "run" / "checkpoints" / "latest").write_text(f"step{first:08d}")  # as if it had stopped there
    after = other.run(run, kind, str(tmp_path), "run", accum2, ep2)
    want, got = _merged(full, "saved"), _merged(after, "loaded")
    assert want.keys() == got.keys()
    differ = [k for k in want if not all(a.equal(b) for a, b in zip(want[k], got[k]))]
    assert not differ, differ[:5]  # master weights and both moments, bit for bit
    assert all(s["loaded_steps"] == first for s in after)
    resumed = _losses(tmp_path / "run", key)
    assert sorted(uninterrupted) == sorted(resumed) == list(range(1, FIRST + MORE + 1))
    gaps = {step: abs(uninterrupted[step] - resumed[step]) / abs(uninterrupted[step]) for step in resumed}
    print(f"{kind} {saved_world} -> {3 - saved_world} ranks: relative loss gaps {gaps}")
    assert all(gaps[step] == 0 for step in range(1, first + 1))  # rows before the resume are kept as they were
    if kind.endswith("+bf16"):
        assert json.loads((tmp_path / "run" / "deepspeed.json").read_text())["bf16"]["enabled"] is True
        assert gaps[first + 1] <= RTOL, gaps  # the resumed data stream on the saved weights
        assert all(gaps[step] <= 2.0 ** -8 for step in range(first + 2, FIRST + MORE + 1)), gaps
        return
    assert all(gap <= RTOL for gap in gaps.values()), (gaps, uninterrupted, resumed)
    if "M" in full[0]:
        assert full[0]["M"] == after[0]["M"] and full[0]["A"] == after[0]["A"]


def test_stream_keys_follow_the_saved_layout():
    """Each micro-batch of a step is a slot of the global batch: 2 ranks x 1 and 1 rank x 2 draw the same."""
    from desmoe.reshard import DataLayout

    two = DataLayout(2, 1)
    assert [two.key(s * 2 + m, 0, 1, 2) for s in range(2) for m in range(2)] == [(0, 0, 2), (0, 1, 2), (1, 0, 2),
                                                                                  (1, 1, 2)]
    one = DataLayout(1, 2)
    assert [one.key(s, r, 2, 1) for s in range(2) for r in range(2)] == [(0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 1)]
    assert two.key(7, 1, 2, 1) == (7, 1, 2)  # the run's own layout: unchanged keys


def _saved_two_ranks(tmp_path):
    """A run directory whose latest checkpoint was saved by 2 ranks x 1 micro-batch of 4 (ZeRO-2)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step00000003").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step00000003")
    (run_dir / "deepspeed.json").write_text(json.dumps({"world_size": 2, "train_micro_batch_size_per_gpu": 4,
                                                        "gradient_accumulation_steps": 1,
                                                        "zero_optimization": {"stage": 2}}))
    return run_dir


def test_another_global_batch_is_refused_in_one_line(tmp_path):
    from desmoe import reshard
    from desmoe.errors import UserError
    from desmoe.recipes.lm.recipe import SmokeRecipe
    from desmoe.training.trainer import Recipe

    run_dir = _saved_two_ranks(tmp_path)
    recipe = SmokeRecipe(None)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}
    with pytest.raises(UserError, match=r"resuming with 1 ranks would change the global batch from 8 to 4 samples "
                                        r"\(train.micro_batch x train.grad_accum x ranks\); train.grad_accum=2 keeps it$"):
        reshard.plan(run_dir, run_dir / "checkpoints", ds, 1, recipe)
    assert reshard.plan(run_dir, run_dir / "checkpoints", dict(ds, gradient_accumulation_steps=2), 1,
                        recipe)["world_size"] == 2
    assert reshard.plan(run_dir, run_dir / "checkpoints", ds, 2, recipe) is None  # same world: the usual resume
    recipe.inelastic = Recipe.inelastic  # a recipe that does not say it converts is refused with the base reason
    with pytest.raises(UserError, match=r"resumed with 1: train does not convert between world sizes \(its state and "
                                        r"data streams were not shown to convert exactly\); resume with 2 ranks$"):
        reshard.plan(run_dir, run_dir / "checkpoints", dict(ds, gradient_accumulation_steps=2), 1, recipe)
    (run_dir / "deepspeed.json").write_text(json.dumps({"world_size": 2, "train_micro_batch_size_per_gpu": 4,
                                                        "gradient_accumulation_steps": 1}))
    recipe.inelastic = ""
    with pytest.raises(UserError, match=r"only ZeRO-1/2 checkpoints convert .*stage=0"):
        reshard.plan(run_dir, run_dir / "checkpoints", dict(ds, gradient_accumulation_steps=2), 1, recipe)


def test_recipes_that_cannot_convert_say_why_in_one_line(tmp_path):
    """TRGE's per-rank generators and DES-MoE's expert copies (spare slots numbered per EP rank) are refused
    by name before any engine exists; DES-MoE without copies converts."""
    from desmoe import reshard
    from desmoe.errors import UserError
    from desmoe.recipes.des_moe.recipe import DESMoERecipe
    from desmoe.recipes.trge.recipe import TRGERecipe

    run_dir = _saved_two_ranks(tmp_path)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    trge = TRGERecipe(_config("trge", str(tmp_path), "run"))
    with pytest.raises(UserError, match=r"saved with 2 ranks, resumed with 1: trge does not convert between world "
                                        r"sizes \(each rank draws its samples, crops and gates' training noise from "
                                        r"generators seeded by its rank, .*\); resume with 2 ranks$"):
        reshard.plan(run_dir, run_dir / "checkpoints", ds, 1, trge)
    cfg = _config("desmoe", str(tmp_path), "run")
    assert reshard.plan(run_dir, run_dir / "checkpoints", ds, 1, DESMoERecipe(cfg))["world_size"] == 2
    cfg.desmoe.dges.duplicate_shared, cfg.desmoe.dges.spare_experts = True, 2
    with pytest.raises(UserError, match=r"resumed with 1: .* \(desmoe.dges.duplicate_shared: the expert copies live "
                                        r"in spare slots whose ids, .* depend on model.ep_size\); resume with 2 ranks$"):
        reshard.plan(run_dir, run_dir / "checkpoints", ds, 1, DESMoERecipe(cfg))


def test_label_scales_weigh_labels_as_the_saved_layout():
    """Instruction data counts only response labels: saved on 2 ranks x 1, each rank's loss was its own mean and
    the ranks averaged; resumed on 1 rank x 2 the two micro-batches must keep weight 1/2 each, not their share
    of the labels (which the run's own 1 x 2 layout gives them)."""
    from types import SimpleNamespace

    from desmoe.reshard import DataLayout, label_scales

    one = SimpleNamespace(rank=0, world=1, grad_accum=2, data_layout=DataLayout(1, 2))
    assert label_scales(one, [30, 10]) == [1.5, 0.5]  # its own layout: the mean over all 40 labels
    assert label_scales(SimpleNamespace(**{**vars(one), "data_layout": DataLayout(2, 1)}), [30, 10]) == [1.0, 1.0]
    assert label_scales(SimpleNamespace(**{**vars(one), "data_layout": DataLayout(2, 1)}), [0, 10]) == [1.0, 1.0]
    four = SimpleNamespace(rank=0, world=1, grad_accum=4, data_layout=DataLayout(2, 2))
    assert label_scales(four, [30, 10, 5, 15]) == [1.5, 0.5, 0.5, 1.5]  # each saved rank's pair, its own mean
