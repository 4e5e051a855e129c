"""DES-MoE expert duplication on 2 real ranks (EP=2, and EP=1 x DP=2 with frozen gradients
skipped), ZeRO-2 AdamW with weight decay: spare slots on every EP rank, copies made at the
first M (at EP=2 one on the other rank), equal
to their originals and the model's function unchanged at creation, each domain's
tokens reach its own copy while the other domain's routing and capacity stay as
they were, and every slot a step does not train stays bit-identical."""
from pathlib import Path

import pytest
import torch

from test_desmoe_ranks import _data, _tiny_model_cfg
from tolerance import assert_close, transformer_terms

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10  # warm-up steps 1-2 (first M at the end of step 2), then stabilisation


def _all_slots(model):
    """[layer] -> [physical slots, n] flat expert weights gathered over the EP group."""
    import deepspeed.comm as dist

    from desmoe.moe import moe_blocks

    out = []
    for blk in moe_blocks(model):
        mine = torch.stack([torch.cat([p.detach().reshape(-1) for p in e.parameters()]) for e in blk.local_experts])
        parts = [torch.empty_like(mine) for _ in range(blk.ep_size)]
        dist.all_gather(parts, mine.contiguous(), group=blk.deepspeed_moe.ep_group)
        out.append(torch.cat(parts))
    return out


def _slot_counts(model):
    import deepspeed.comm as dist

    from desmoe.moe import moe_blocks

    counts = torch.stack([b.last_stats.tokens_per_expert for b in moe_blocks(model)]).clone()
    dist.all_reduce(counts)
    logical = torch.stack([torch.bincount(b.last_routing.expert_ids.reshape(-1), minlength=4)
                           for b in moe_blocks(model)])
    dist.all_reduce(logical)
    return counts, logical


# Per EP size: the originals' slots, the spares, the copy of expert 0 (for B) and of expert 1 (for A):
# EP=2 puts one spare on each rank (A's copy of expert 1 goes to the other rank), EP=1 (DP=2) both on one.
LAYOUT = {2: ([0, 1, 3, 4], [2, 5], 2, 5), 1: ([0, 1, 2, 3], [4, 5], 4, 5)}


def duplication_case(ep):
    import deepspeed.comm as dist

    from desmoe.engine import build_engine, read_ds_config, refresh_master_weights, resolve_ds_config
    from desmoe.recipes.des_moe.config import DESMoEConfig
    from desmoe.recipes.des_moe.method import DESMoE
    from desmoe.models.moe_lm import MoELM
    from desmoe.moe import moe_blocks
    from desmoe.recipes.des_moe.recipe import domain_of_step

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DESMoEConfig()
    cfg.dges.duplicate_shared, cfg.dges.spare_experts, cfg.dges.update_every = True, 2, 0
    torch.manual_seed(0)
    model = MoELM(_tiny_model_cfg(ep_size=ep))
    originals, spares, copy0, copy1 = LAYOUT[ep]
    model.setup_expert_parallel()
    method = DESMoE(cfg, STEPS, 2, aux_coef=0.0)
    parts = method.prepare_model(model)
    blocks = moe_blocks(model)
    # one spare per rank: logical 0,1 -> slots 0,1 (rank 0), logical 2,3 -> slots 3,4 (rank 1), spares 2 and 5
    assert [b.slot_of_expert.tolist() for b in blocks] == [originals] * 2 and method.copies.spares == [spares] * 2
    ds = resolve_ds_config(read_ds_config(ROOT / "configs/zero2.json"), micro_batch=4, lr=1e-2)
    engine, train = build_engine(model, ds, parts=parts)
    method.on_weights_changed = lambda tags: refresh_master_weights(engine, tags)
    method.enable_gradient_skipping(engine.module, parts)
    data = _data()
    method.attach(engine.module, train, data, rank, world, 4, 32)
    streams = [data.batches("train", 4, 32, 0, rank, world, 0, domains=[d]) for d in data.domains]

    def step_once(step):
        domain = domain_of_step(step, 2, 0)
        batch = next(streams[domain])
        method.begin_step(step, domain)
        method.sync_gradients()
        loss, _ = method.loss(batch.input_ids, batch.token_domain[:, :-1])
        engine.backward(loss)
        engine.step()
        return domain, batch

    for step in (0, 1):
        domain, batch = step_once(step)
        if step == 1 and rank == 0:  # routing statistics that make experts 0 and 1 shared, 2 B's, 3 nobody's
            method.dmap.window[:, 0] += torch.tensor([2e6, 1.5e6, 0, 0], dtype=torch.float64)
            method.dmap.window[:, 1] += torch.tensor([1.6e6, 2e6, 1.5e6, 0], dtype=torch.float64)
            method.dmap.window_tokens += 1e6
        before_copy = _all_slots(engine.module)
        method.end_step(step, batch.token_domain[:, :-1])
    assert method.copies.made and method.copies.count == 4  # 2 layers x 2 shared experts
    # A keeps expert 0 (higher affinity), B gets a copy on rank 0; B keeps 1, A's copy of 1 goes to rank 1
    o = originals
    assert [t.tolist() for t in method.copies.tables] == [[[o[0], copy1, o[2], o[3]], [copy0, o[1], o[2], o[3]]]] * 2
    created = _all_slots(engine.module)
    for layer in range(2):
        assert torch.equal(created[layer][copy0], created[layer][o[0]])
        assert torch.equal(created[layer][copy1], created[layer][o[1]])
        assert not torch.equal(before_copy[layer][copy1], created[layer][o[1]])  # the spare held other weights
        for slot in originals:
            assert torch.equal(created[layer][slot], before_copy[layer][slot])
    # At creation the function is unchanged, B's tokens run on B's copy, A's routing and capacity are as before.
    engine.module.eval()
    for d in (0, 1):
        batch = next(data.batches("val", 4, 32, 3, rank, world, 0, domains=[data.domains[d]]))
        ids, tdom = batch.input_ids[:, :-1], batch.token_domain[:, :-1]
        with torch.no_grad():
            plain = engine.module(ids)
            for b, blk in enumerate(moe_blocks(engine.module)):
                blk.route_slots = method.copies.route_slots(b, tdom)
            copied = engine.module(ids)
            for blk in moe_blocks(engine.module):
                blk.route_slots = None
        # the same weights in other slots: the forward of _tiny_model_cfg on 4 x 32 tokens
        assert_close(copied, plain, terms=transformer_terms(hidden=32, layers=2, seq=32, ffn=32, heads=2, top_k=2))
        slots, logical = _slot_counts(engine.module)
        for layer in range(2):
            want = torch.zeros(6, dtype=torch.long).index_add_(0, method.copies.tables[layer][d], logical[layer])
            assert torch.equal(slots[layer], want), (d, layer, slots[layer], want)
        mine, other = (copy0, copy1) if d == 1 else (copy1, copy0)  # its own copy is used, not the other's
        assert slots[:, mine].sum() > 0 and slots[:, other].sum() == 0, (d, slots)
    engine.module.train()
    # Stabilisation: a step trains exactly its domain's slots of S_d; every other slot is bit-identical.
    moved = set()
    for step in range(2, 6):
        prev = _all_slots(engine.module)
        domain, _ = step_once(step)
        slots, logical = _slot_counts(engine.module)  # the training forward ran each route on its domain's slot
        for layer in range(2):
            assert torch.equal(slots[layer], torch.zeros(6, dtype=torch.long).index_add_(
                0, method.copies.tables[layer][domain], logical[layer])), (step, layer)
        now = _all_slots(engine.module)
        for layer in range(2):
            mine = set(method.copies.slots_for(layer, [domain], method.dmap.experts_for(layer, domain)))
            for slot in range(6):
                changed = not torch.equal(prev[layer][slot], now[layer][slot])
                assert slot in mine or not changed, (step, domain, layer, slot, "frozen slot moved")
                moved |= {(layer, slot)} if changed else set()
    assert moved == {(layer, slot) for layer in range(2) for slot in range(6) if slot != o[3]}, moved
    # Unlabelled inference, "average": each expert's output is the mean over its original and copies;
    # every expert here has at most one copy, so that is the mean of running all tokens as A and as B.
    method.copies.apply_inference("average")
    blk, x = moe_blocks(engine.module)[0], torch.randn(64, 32, generator=torch.Generator().manual_seed(rank))
    engine.module.eval()
    with torch.no_grad():
        y_avg = blk(x)
        blk.slot_fanout, ys = None, []
        for d in (0, 1):
            blk.route_slots = method.copies.route_slots(0, torch.full((64,), d))
            ys.append(blk(x))
        blk.route_slots = None
    assert (ys[0] - ys[1]).abs().max() > 1e-4, "the copies never diverged from their originals"
    # one block (d 32 -> 32 -> 32, top-2): the mean of two copies' outputs vs the fan-out's weight split
    assert_close(y_avg, (ys[0] + ys[1]) / 2, terms=2 * 32 + 32 + 2 + 2)
    return True


@pytest.mark.parametrize("ep", [2, 1], ids=["ep2", "ep1-dp2"])
def test_duplication_copies_and_isolation(ranks, ep):
    assert ranks.run(duplication_case, ep) == [True, True]


def test_duplication_switches_are_checked():
    from desmoe.config import load_config
    from desmoe.errors import ConfigError
    from desmoe.recipes.des_moe.recipe import DESMoEExperiment

    base = ["data.domains=[email, xml]", "model.ep_size=2", "desmoe.dges.duplicate_shared=true"]
    for extra, key in ((["desmoe.dges.spare_experts=0"], "spare_experts"),
                       (["desmoe.dges.spare_experts=3"], "spare_experts"),
                       (["desmoe.dges.spare_experts=2", "base.checkpoint=runs/x"], "duplicate_shared"),
                       (["desmoe.dges.spare_experts=2", "desmoe.dges.batching=mixed"], "batching")):
        with pytest.raises(ConfigError, match=key):
            load_config(DESMoEExperiment, None, base + extra)
    load_config(DESMoEExperiment, None, base + ["desmoe.dges.spare_experts=2", "desmoe.dges.batching=token"])
