"""Per-expert trainability under ZeRO-2 + AdamW with weight decay, on 2 real ranks (EP=2)."""
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_engine(ep_size=2, lr=1e-2, seed=0, unit=None):
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.models.moe_lm import MoELM, MoELMConfig

    cfg = MoELMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32, num_experts=4,
                      top_k=2, ffn_size=32, ep_size=ep_size, init_seed=seed)
    model = MoELM(cfg)
    model.setup_expert_parallel()
    ds = resolve_ds_config(read_ds_config(ROOT / "configs/zero2.json"), micro_batch=4, lr=lr)
    return build_engine(model, ds, parts={"router": lambda n: ".router." in n}, expert_unit=unit)


def batch_for(step, rank, vocab=64, seq=17):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (4, seq), generator=gen)  # shape test data: random tokens


def expert_snapshot(engine):
    from desmoe.moe import moe_blocks

    return {(b, g): [p.detach().clone() for p in block.local_experts[i].parameters()]
            for b, block in enumerate(moe_blocks(engine.module))
            for i, g in enumerate(block.local_global_ids())}


def frozen_set_case():
    import deepspeed.comm as dist

    engine, train = tiny_engine()
    rank = dist.get_rank()
    frozen = {(0, 0), (0, 3), (1, 1)}  # (block, global id): spread over both EP ranks
    for b in range(2):
        train.set_experts(b, [g for g in range(4) if (b, g) not in frozen])
    train.set_part("router", False)
    router_before = [p.detach().clone() for n, p in engine.module.named_parameters() if ".router." in n]
    before = expert_snapshot(engine)
    for step in range(6):
        loss, _ = engine.module.loss(batch_for(step, rank), aux_coef=0.01)
        engine.backward(loss)
        engine.step()
    after = expert_snapshot(engine)
    report = {}
    for key in before:
        same = all(torch.equal(a, b) for a, b in zip(before[key], after[key]))
        report[key] = same
        assert same == (key in frozen), f"expert {key}: unchanged={same}, frozen={key in frozen}"
    router_after = [p.detach().clone() for n, p in engine.module.named_parameters() if ".router." in n]
    assert all(torch.equal(a, b) for a, b in zip(router_before, router_after)), "frozen router moved"
    # Change the set between steps: unfreeze everything but (1, 2) and the router.
    for b in range(2):
        train.set_experts(b, [g for g in range(4) if (b, g) != (1, 2)])
    train.set_part("router", True)
    mid = expert_snapshot(engine)
    for step in range(6, 9):
        loss, _ = engine.module.loss(batch_for(step, rank), aux_coef=0.01)
        engine.backward(loss)
        engine.step()
    end = expert_snapshot(engine)
    for key in mid:
        same = all(torch.equal(a, b) for a, b in zip(mid[key], end[key]))
        assert same == (key == (1, 2)), f"after change, expert {key}: unchanged={same}"
    router_end = [p.detach() for n, p in engine.module.named_parameters() if ".router." in n]
    assert not all(torch.equal(a, b) for a, b in zip(router_after, router_end)), "unfrozen router did not move"
    return report


def test_frozen_experts_bit_identical_under_zero2(ranks):
    reports = ranks.run(frozen_set_case)
    # each EP rank owns half of the experts of each of the 2 blocks
    assert [len(r) for r in reports] == [4, 4]
