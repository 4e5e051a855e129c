"""TRGE expert groups on 2 real ranks: EP=2 (groups on different ranks) == EP=1,
and groups of finished tasks stay bit-identical under ZeRO-2 + AdamW while the
next task trains (also when the new task's forward uses them), with one optimizer
group per task group as the TRGE run builds it."""
import pytest
import torch
from tolerance import assert_close, module_terms

T, NG = 4, 2  # 8 experts: with EP=2 groups 0-1 live on rank 0, groups 2-3 on rank 1


def _model(ep_size):
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.groups import GroupSpec, setup_groups
    from desmoe.recipes.trge.model import Placement, TRGEModel

    bb = load_backbone(BackboneConfig(hidden_size=32, layers=2, seed=3))
    model = TRGEModel(bb.model, GroupSpec(num_tasks=T, experts_per_group=NG, top_k=1, bottleneck=8,
                                          scale=1.0, ep_size=ep_size), Placement())
    setup_groups(model, seed=5)
    return model, bb


def _digits(rank, n=6):
    from desmoe.recipes.trge.data import load_mnist_5k

    images, labels = load_mnist_5k()
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(rank))[:n].numpy()
    return images[pick], labels[pick]


def ep_parity_case():
    import deepspeed.comm as dist

    from desmoe.moe.layer import moe_blocks

    rank = dist.get_rank()
    (m1, bb), (m2, _) = _model(1), _model(2)
    for m in (m1, m2):
        m.eval()  # no gate noise: both must compute the same function
        for block in moe_blocks(m):  # non-zero gates so the intra-group choice matters
            for t, gate in enumerate(block.router.gates):
                torch.nn.init.normal_(gate.w_gate, std=0.5, generator=torch.Generator().manual_seed(t))
            for local_id, gid in enumerate(block.local_global_ids()):  # trained-size adapters, by global id
                torch.nn.init.normal_(block.local_experts[local_id].up.weight, std=0.3,
                                      generator=torch.Generator().manual_seed(100 + gid))
    images, _ = _digits(rank)
    px = bb.pixels(images)
    # every sample mixes a group on rank 0 with one on rank 1
    w = torch.zeros(len(px), T)
    w[:, 0 if rank == 0 else 1] = 0.6
    w[:, 3 if rank == 0 else 2] = 0.4
    ids, mask = bb.tokenize(["a photo of the number: zero.", "a photo of the number: one."])
    outs = []
    for m in (m1, m2):
        logits = m(px, ids, mask, w, w[:2])
        logits.square().sum().backward()
        outs.append(logits.detach())
    # both towers and their adapters on this batch (text: 2 prompts of <= 16 tokens per attention layer)
    terms = module_terms(m1, attention=6 * 2 * 16)
    assert_close(outs[1], outs[0], terms=terms, msg="logits")
    with torch.no_grad():
        assert (m1.image_features(px) - m1.image_features(px, w)).abs().max() > 1e-3  # adapters act
    b1, b2 = moe_blocks(m1), moe_blocks(m2)
    for x, y in zip(b1, b2):
        for g1, g2 in zip(x.router.gates, y.router.gates):  # (noise weights are unused in eval)
            assert_close(g2.w_gate.grad, g1.w_gate.grad, terms=2 * terms + len(px), msg="gate gradient")
        summed = [p.grad.clone() for p in x.local_experts.parameters()]
        for g in summed:
            dist.all_reduce(g)
        per = len(summed) // len(x.local_experts)
        for local_id, gid in enumerate(y.local_global_ids()):
            for g, p2 in zip(summed[gid * per:(gid + 1) * per], y.local_experts[local_id].parameters()):
                assert_close(p2.grad, g, terms=2 * terms + 2 * len(px), msg=f"adapter {gid} gradient")
    # ownership: this rank holds exactly the groups the layout places on it
    owned = {g for g in range(T) if b2[0].layout.owner(b2[0].layout.group(f"task{g}")[0])[0] == rank}
    return sorted(owned)


def freeze_case():
    import deepspeed.comm as dist

    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.moe.layer import moe_blocks
    from desmoe.recipes.trge.groups import gate_parts, group_unit, train_only_group

    rank = dist.get_rank()
    model, bb = _model(2)
    cfg = resolve_ds_config(read_ds_config("configs/zero2.json"), micro_batch=6, lr=5e-3)
    engine, trainability = build_engine(model, cfg, parts=gate_parts(T), expert_unit=group_unit(model))
    assert len([g for g in trainability.optimizer.param_groups if "desmoe_unit" in g]) == 2 * 2  # 2 tasks/rank
    images, labels = _digits(rank)
    px, y = bb.pixels(images), torch.as_tensor(labels)
    ids, mask = bb.tokenize([f"a photo of the number {i}." for i in range(10)])

    def snapshot():
        state = {}
        for b, block in enumerate(moe_blocks(model)):
            for local_id, gid in enumerate(block.local_global_ids()):
                for n, p in block.local_experts[local_id].named_parameters():
                    state[("expert", b, gid, n)] = p.detach().clone()
            for t, gate in enumerate(block.router.gates):
                for n, p in gate.named_parameters():
                    state[("gate", b, t, n)] = p.detach().clone()
        return state

    def train(task, w_row, steps=3):
        train_only_group(trainability, model, task)
        w = torch.tensor(w_row).repeat(len(px), 1)
        for _ in range(steps):
            logits = engine(px, ids, mask, w, w[:1].repeat(10, 1))
            loss = torch.nn.functional.cross_entropy(logits, y)
            engine.backward(loss)
            engine.step()

    before = snapshot()
    train(0, [1.0, 0.0, 0.0, 0.0])
    after0 = snapshot()
    train(1, [0.3, 0.7, 0.0, 0.0])  # group 0 in the forward: gets gradients, must not move
    after1 = snapshot()

    def group_of(key):
        return key[2] // NG if key[0] == "expert" else key[2]

    moved = {0: False, 1: False}
    for key in before:
        g = group_of(key)
        if g == 0:
            assert torch.equal(after0[key], after1[key]), f"finished group 0 changed: {key}"
            moved[0] |= not torch.equal(before[key], after0[key])
        elif g == 1:
            assert torch.equal(before[key], after0[key]), f"group 1 moved during task 0: {key}"
            moved[1] |= not torch.equal(after0[key], after1[key])
        else:
            assert torch.equal(before[key], after1[key]), f"untrained group {g} moved: {key}"
    # group sizes never grow
    for block in moe_blocks(model):
        assert all(len(block.layout.group(f"task{t}")) == NG for t in range(T))
    return moved


@pytest.fixture(scope="module", autouse=True)
def digits_cached():
    from desmoe.recipes.trge.data import load_mnist_5k

    load_mnist_5k()  # fetch once here, not from two ranks at the same time


def test_ep2_equals_ep1_groups_on_different_ranks(ranks):
    owned = ranks.run(ep_parity_case)
    assert owned == [[0, 1], [2, 3]]


def test_finished_groups_bit_identical_zero2(ranks):
    moved = ranks.run(freeze_case)
    # a group only counts as moved on the rank that owns its experts, or via its gate
    assert any(m[0] for m in moved) and any(m[1] for m in moved)
