"""DES-MoE Eq. 8 (``dges.batching: token``) on 2 real ranks, EP=2: in a batch mixing
two domains, an expert owned by one domain only gets exactly the gradient of that
domain's tokens, experts owned by neither get none and stay bit-identical under
ZeRO-2 AdamW with weight decay; and the trainer runs mixed batches end to end."""
from pathlib import Path

import torch
import torch.nn.functional as F

from test_desmoe_ranks import _data, _tiny_model_cfg, trainer_case
from tolerance import assert_close, transformer_terms

ROOT = Path(__file__).resolve().parents[1]
OWNS = {0: {0, 1}, 1: {1, 2}}  # domain A owns experts 0, 1; domain B owns 1, 2; nobody owns 3


def _method(model, steps=10):
    from desmoe.recipes.des_moe.config import DESMoEConfig
    from desmoe.recipes.des_moe.method import DESMoE

    cfg = DESMoEConfig()
    cfg.dges.batching, cfg.dges.update_every = "token", 0
    method = DESMoE(cfg, steps, 2, aux_coef=0.0)
    parts = method.prepare_model(model)
    M = torch.zeros(2, 2, 4, dtype=torch.bool)  # [layer, domain, expert], set by hand
    for d, experts in OWNS.items():
        M[:, d, sorted(experts)] = True
    method.dmap.M, method.dmap.A = M, M.double()
    return method, parts


def _mixed_batch(rank, world):
    """Rows alternate A, B: each row is one domain, so rows never see each other."""
    data = _data()
    a, b = (next(data.batches("train", 2, 32, 0, rank, world, 0, domains=[d])) for d in data.domains)
    ids = torch.stack([a.input_ids[0], b.input_ids[0], a.input_ids[1], b.input_ids[1]])
    tdom = torch.stack([a.token_domain[0], b.token_domain[0], a.token_domain[1], b.token_domain[1]])
    return ids, tdom[:, :-1]


def _expert_grads(model):
    from desmoe.moe import moe_blocks

    return {(b, g): torch.cat([p.grad.reshape(-1) for p in blk.local_experts[i].parameters()])
            for b, blk in enumerate(moe_blocks(model)) for i, g in enumerate(blk.local_global_ids())}


def token_mask_case():
    import deepspeed.comm as dist

    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.models.moe_lm import MoELM
    from desmoe.moe import moe_blocks

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = MoELM(_tiny_model_cfg(ep_size=2))
    model.setup_expert_parallel()
    method, parts = _method(model)
    ids, tdom = _mixed_batch(rank, world)
    # Gradients, plain autograd: the masked mixed batch vs each domain's own loss without any mask.
    method.model, method.mask_routes, method.lam = model, True, 0.0
    model.zero_grad()
    method.loss(ids, tdom)[0].backward()
    masked = _expert_grads(model)
    method.mask_routes = False
    refs = {}
    for d in (0, 1):
        model.zero_grad()
        logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        (nll[tdom.reshape(-1) == d].sum() / nll.numel()).backward()  # this domain's share of the mean loss
        refs[d] = _expert_grads(model)
    b_reaches_0 = 0.0
    for key, g in masked.items():
        owners = [d for d in (0, 1) if key[1] in OWNS[d]]
        want = sum((refs[d][key] for d in owners), torch.zeros_like(g))
        # _tiny_model_cfg's backward; expert gradients sum over the 2 x 128 tokens of both ranks
        assert_close(g, want, terms=transformer_terms(hidden=32, layers=2, seq=32, ffn=32, heads=2, top_k=2,
                                                      backward=True, tokens=256), msg=f"{key} owners {owners}")
        if key[1] == 0:
            b_reaches_0 = max(b_reaches_0, refs[1][key].abs().max().item())
        if not owners:
            assert torch.count_nonzero(g) == 0, key
    # ZeRO-2 AdamW (weight decay 0.1): two mixed steps; expert 3 (no owner) bit-identical, the others move.
    ds = resolve_ds_config(read_ds_config(ROOT / "configs/zero2.json"), micro_batch=4, lr=1e-2)
    engine, train = build_engine(model, ds, parts=parts)
    method.enable_gradient_skipping(engine.module, parts)
    method.attach(engine.module, train, None, rank, world, 4, 32)
    snap = lambda: {k: torch.cat([p.detach().reshape(-1).clone() for p in blk.local_experts[i].parameters()])  # noqa
                    for b, blk in enumerate(moe_blocks(engine.module)) for i, k in
                    enumerate((b, g) for g in blk.local_global_ids())}
    before = snap()
    for step in (4, 5):  # stabilisation: router + the present domains' experts
        method.begin_step(step, [0, 1])
        assert method.mask_routes
        method.sync_gradients()
        loss, _ = method.loss(ids, tdom)
        engine.backward(loss)
        engine.step()
    after = snap()
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == (key[1] == 3), (key, "expected bit-identical" if key[1] == 3 else "expected to move")
    return b_reaches_0


def test_token_mask_mixed_batch_ep2(ranks):
    reach = ranks.run(token_mask_case)
    assert max(reach) > 1e-6, "domain B's tokens never reach expert 0: the mask would not be exercised"


def test_trainer_mixed_batches_and_copies_ep2(ranks, tmp_path):
    import json

    # mixed batches together with expert duplication (spare slots, copies at the first M), and exact resume
    extra = ["desmoe.dges.batching=token", "train.save_every=3", "train.eval_every=6", "desmoe.schedule.t1=0.34",
             "desmoe.dges.duplicate_shared=true", "desmoe.dges.spare_experts=2", "desmoe.dges.phi=0.1"]
    full = ranks.run(trainer_case, str(tmp_path), 6, "desmoe", extra)[0]
    (tmp_path / "desmoe" / "checkpoints" / "latest").write_text("step00000003")  # as if it died after step 3
    resumed = ranks.run(trainer_case, str(tmp_path), 6, "desmoe", extra)[0]
    for key in ("email", "xml", "general"):  # copies, their table and the mixed stream resume exactly
        assert resumed[key] == full[key], (key, resumed[key], full[key])
    rows = [json.loads(line) for line in (tmp_path / "desmoe" / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("train/domain") for r in rows if "train/domain" in r} == {-1.0}  # no per-step domain
    copies = [r["dges/expert_copies"] for r in rows if "dges/expert_copies" in r]
    assert copies and copies[0] > 0, "phi=0.1 makes experts shared: copies expected"
    assert json.loads((tmp_path / "desmoe" / "results.json").read_text())["method"] == "desmoe"
