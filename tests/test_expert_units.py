"""Expert units: experts sharing one optimizer group (TRGE: a task's experts in every
block), frozen only whole; and the guards around them and around trainable-only saves."""
import pytest
import torch

from test_freeze_zero2 import batch_for, tiny_engine

T, NG = 3, 2


def _trge_model():
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.groups import GroupSpec, setup_groups
    from desmoe.recipes.trge.model import Placement, TRGEModel

    bb = load_backbone(BackboneConfig(hidden_size=32, layers=2))
    model = TRGEModel(bb.model, GroupSpec(num_tasks=T, experts_per_group=NG, bottleneck=8), Placement())
    setup_groups(model, seed=1)
    return model


def test_task_group_units_share_a_group_and_change_only_whole():
    from desmoe.moe.layer import moe_blocks
    from desmoe.moe.trainability import EXPERT_KEY, UNIT_KEY, FreezableAdamW, Trainability, build_param_groups
    from desmoe.recipes.trge.groups import gate_parts, group_unit, train_only_group

    model = _trge_model()
    B = len(moe_blocks(model))
    per_expert = [g for g in build_param_groups(model, gate_parts(T)) if EXPERT_KEY in g]
    groups = build_param_groups(model, gate_parts(T), expert_unit=group_unit(model))
    units = [g for g in groups if EXPERT_KEY in g]
    assert len(per_expert) == B * T * NG * 2 and len(units) == T * 2  # x (decay, no-decay)
    for g in units:  # a unit holds its task's experts of every block, and nothing else
        t = int(g[UNIT_KEY].removeprefix("task"))
        assert sorted(g[EXPERT_KEY]) == [(b, e) for b in range(B) for e in range(t * NG, (t + 1) * NG)]
    assert sum(p.numel() for g in units for p in g["params"]) == sum(p.numel() for g in per_expert for p in g["params"])

    train = Trainability(FreezableAdamW(groups, lr=1e-2, foreach=False))
    train_only_group(train, model, 1)
    assert all(train.trainable_experts(b) == {2, 3} for b in range(B))
    train.set_experts(0, [2, 3])  # consistent with the other blocks: allowed, no change
    with pytest.raises(ValueError, match=r"unit 'task0' changes only whole"):
        train.set_experts(0, [0, 1])  # task0 would train in block 0 only
    with pytest.raises(ValueError, match=r"unit 'task1' changes only whole"):
        train.set_expert_blocks({b: [2] for b in range(B)})  # half of each block's task1 experts
    assert all(train.trainable_experts(b) == {2, 3} for b in range(B)), "a refused request changed something"
    train_only_group(train, model, 2)
    assert all(train.trainable_experts(b) == {4, 5} for b in range(B))


def guards_case(ckpt_dir):
    import deepspeed.comm as dist

    from desmoe import checkpoint
    from desmoe.errors import ConfigError

    out = {}
    # units that split unevenly over the EP ranks give ranks different group counts: ZeRO would hang
    try:
        tiny_engine(ep_size=2, unit=lambda b, e: "first" if e == 0 else (b, e))
    except ConfigError as err:
        out["uneven"] = str(err)
    # a parameter the optimizer owns but has frozen for now must not be left out of a trainable-only save
    engine, train = tiny_engine(ep_size=2, unit=lambda b, e: e)  # expert e of both blocks: 2 units per rank
    out["units"] = sorted({g["desmoe_unit"] for g in train.optimizer.param_groups if "desmoe_unit" in g})
    loss, _ = engine.module.loss(batch_for(0, dist.get_rank()), aux_coef=0.01)
    engine.backward(loss)
    engine.step()
    router = next(p for n, p in engine.module.named_parameters() if ".router." in n)
    router.requires_grad_(False)
    try:
        checkpoint.save(engine, ckpt_dir, step=1, trainable_only=True)
    except ValueError as err:
        out["dropped"] = str(err)
    return out


def test_uneven_units_and_trainable_only_guard(ranks, tmp_path):
    out = ranks.run(guards_case, str(tmp_path))
    assert out[0]["units"] == [0, 1] and out[1]["units"] == [2, 3]
    for o in out:
        assert "ZeRO needs the same number on every rank" in o.get("uneven", ""), o
        assert ".router." in o.get("dropped", "") and "the optimizer trains" in o["dropped"], o
