"""Which tokens the routing statistics count (``desmoe.routing_stats_tokens``), on 2 real ranks (EP=2).

Real instruction batches (tests/instructfix.py: prompt and response, loss on the response) through a
tiny desmoe MoE whose routers may only pick experts {0, 1} at prompt positions and {2, 3} at response
positions (the core's ``allowed_experts``; which of the two stays the real router's choice), so the
prompt tokens' statistics differ from the response tokens' and counting them shows.  DGES's A (Eq. 5,
reduced over the ranks at the refresh) and ESFT's token and gate scores (reduced over the ranks, the
profile taken by the ESFT method itself) must equal what the test computes from the routing of the
response positions only ("response") or of every position ("all"), summed over the ranks with
desmoe.collectives.  Text-only data (every label counts) gives bit-identical statistics in both modes
and to the path without the switch.
"""
from __future__ import annotations

import pytest
import torch

from instructfix import instruct_data  # noqa: F401

E, MB, SEQ = 4, 4, 32


def _model(vocab):
    from desmoe.models.moe_lm import MoELM, MoELMConfig

    torch.manual_seed(0)
    model = MoELM(MoELMConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=SEQ,
                              num_experts=E, top_k=1, ffn_size=32, ep_size=2))
    model.setup_expert_parallel()
    return model.eval()


def _route_by_part(model, response):
    """Prompt positions may choose experts {0, 1} only, response positions {2, 3} only."""
    from desmoe.moe import moe_blocks

    flat = response.reshape(-1)
    allowed = torch.zeros(flat.numel(), E, dtype=torch.bool)
    allowed[~flat, :2] = True
    allowed[flat, 2:] = True
    for block in moe_blocks(model):
        block.router.allowed_experts = allowed


def _expected(model, counted, dom, domain):
    """From the routing itself: per layer the share of the counted tokens of ``domain`` that chose each
    expert (A's row), and the ESFT sums (counts, gate values, tokens), all summed over the ranks."""
    from desmoe.collectives import all_reduce_
    from desmoe.moe import moe_blocks

    a_rows, counts, gates = [], [], []
    sel = counted.reshape(-1)
    for block in moe_blocks(model):
        r = block.last_routing
        ids = r.expert_ids[:, 0]
        g = r.scores.gather(1, r.expert_ids)[:, 0].double()
        mine = sel & (dom.reshape(-1) == domain)
        c = all_reduce_(torch.bincount(ids[mine], minlength=E).double())
        n = all_reduce_(torch.tensor([float(mine.sum())], dtype=torch.float64))
        a_rows.append(c / n.clamp_min(1.0))
        counts.append(all_reduce_(torch.bincount(ids[sel], minlength=E).double()))
        gates.append(all_reduce_(torch.zeros(E, dtype=torch.float64).index_add_(0, ids[sel], g[sel])))
    tokens = float(all_reduce_(torch.tensor([float(sel.sum())], dtype=torch.float64)))
    return torch.stack(a_rows), torch.stack(counts), torch.stack(gates), tokens


def stats_case(root: str) -> dict:
    import deepspeed.comm as dist

    from desmoe.data import PreparedData
    from desmoe.moe import moe_blocks
    from desmoe.recipes.des_moe.baselines import ESFTToken
    from desmoe.recipes.des_moe.config import BaselineConfig, DESMoEConfig
    from desmoe.recipes.des_moe.dges import DomainExpertMap, stats_token_domain
    from desmoe.recipes.des_moe.esft import RoutingProfile

    rank, world = dist.get_rank(), dist.get_world_size()
    data = PreparedData(root)
    model = _model(data.tokenizer.vocab_size)
    layers, num_domains = len(moe_blocks(model)), len(data.domains)
    out = {}
    # ESFT's profile: the method's own _profile (one batch of its stream), compared with that batch.
    seed = 0
    batch = next(data.batches("train", MB, SEQ, seed + 5934875, rank, world, 0, domains=["qa"], homogeneous=True))
    response = batch.loss_mask[:, 1:]  # input position t counts iff its label (t+1) is in the loss
    assert response.any() and not response.all(), "the batch needs prompt and response positions"
    dom = batch.token_domain[:, :-1]
    qa = data.domain_id("qa")
    _route_by_part(model, response)
    for tokens in ("response", "all"):
        cfg = DESMoEConfig(routing_stats_tokens=tokens, baseline=BaselineConfig(esft_profile_tokens=world * MB * SEQ))
        profile = ESFTToken(cfg, 10, num_domains, 0.0, seed=seed)._profile(model, data, ["qa"], rank, world, MB, SEQ)
        counted = response if tokens == "response" else torch.ones_like(response)
        a_row, counts, gates, n = _expected(model, counted, dom, qa)
        assert profile.tokens == n, (tokens, profile.tokens, n)
        assert torch.equal(profile.count, counts) and torch.equal(profile.gate_sum, gates), tokens
        # DGES: A from the same forward, through the recipe's function, reduced at the refresh.
        dmap = DomainExpertMap(layers, num_domains, E)
        dmap.record_model(model, stats_token_domain(dom, batch.loss_mask, tokens))
        dmap.refresh()
        assert torch.equal(dmap.A[:, qa], a_row), (tokens, dmap.A[:, qa], a_row)
        out[tokens] = {"A": dmap.A[:, qa], "token_scores": profile.token_scores(), "gate": profile.gate_scores()}
    # Text-only data: every label counts, both settings give exactly the statistics of before.
    text = next(data.batches("train", MB, SEQ, 1, rank, world, 0, domains=["prose"], homogeneous=True))
    assert bool(text.loss_mask.all()), "prose must be text-only"
    for block in moe_blocks(model):
        block.router.allowed_experts = None
    tdom = text.token_domain[:, :-1]
    with torch.no_grad():
        model(text.input_ids[:, :-1])
    before = DomainExpertMap(layers, num_domains, E)
    before.record_model(model, tdom)
    before.refresh()
    old = RoutingProfile(layers, E)
    old.record_model(model)
    old.all_reduce()
    for tokens in ("response", "all"):
        assert stats_token_domain(tdom, text.loss_mask, tokens) is tdom
        now = DomainExpertMap(layers, num_domains, E)
        now.record_model(model, stats_token_domain(tdom, text.loss_mask, tokens))
        now.refresh()
        assert torch.equal(now.A, before.A), tokens
        from desmoe.recipes.des_moe.dges import counted_positions

        prof = RoutingProfile(layers, E)
        prof.record_model(model, counted_positions(text.loss_mask, tokens))
        prof.all_reduce()
        assert torch.equal(prof.count, old.count) and torch.equal(prof.gate_sum, old.gate_sum) \
            and prof.tokens == old.tokens, tokens
    return out


def test_routing_stats_count_the_chosen_tokens(ranks, instruct_data):
    results = ranks.run(stats_case, str(instruct_data))
    for key in ("A", "token_scores", "gate"):  # the reduced statistics are the same on both ranks
        for tokens in ("response", "all"):
            assert torch.equal(results[0][tokens][key], results[1][tokens][key]), (key, tokens)
    r, a = results[0]["response"], results[0]["all"]
    # The test can fail: prompt positions chose only experts 0 and 1, so counting them shows there.
    assert torch.all(r["A"][:, :2] == 0) and torch.all(r["token_scores"][:, :2] == 0), r
    assert torch.all(a["A"][:, :2].sum(-1) > 0) and torch.all(a["token_scores"][:, :2].sum(-1) > 0), a
    assert torch.all(r["A"][:, 2:].sum(-1) == 1), r["A"]  # top-1: every response position once


def test_routing_stats_tokens_is_validated():
    from desmoe.config import load_config
    from desmoe.errors import UserError
    from desmoe.recipes.des_moe.config import DESMoEExperiment

    assert load_config(DESMoEExperiment, None, []).desmoe.routing_stats_tokens == "response"
    assert load_config(DESMoEExperiment, None, ["desmoe.routing_stats_tokens=all"]).desmoe.routing_stats_tokens == "all"
    with pytest.raises(UserError) as err:
        load_config(DESMoEExperiment, None, ["desmoe.routing_stats_tokens=prompt"])
    msg = str(err.value)
    assert "\n" not in msg and "desmoe.routing_stats_tokens" in msg and "'response'" in msg, msg
