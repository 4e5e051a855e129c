"""Every routing option of every supported HF MoE family: same logits and same gradients as
transformers at EP=1 and EP=2 (2 real gloo ranks), or a one-line refusal at load.

Options come from the transformers config classes (tests/hf_options.py): a seeded random sample of
each family's grid covering num_experts_per_tok 1..E and every value of every other option.  One
rank-pool call per family runs the whole sample.  Each configuration is a fresh random checkpoint
(routers drawn wide so tokens spread; DeepSeek-V3/GLM selection biases and GPT-OSS expert biases
non-zero).  The loss is a fixed random projection of the logits summed over both ranks' tokens, so
the reference gradient of a parameter is transformers' gradient on all tokens; desmoe's non-expert
gradients are summed over the ranks (data parallel), its expert gradients too at EP=1, while at
EP=2 each expert's gradient already holds both ranks' tokens (all-to-all).

Bounds come from tests/tolerance.py (dtype, reduction lengths, magnitudes).  The test can fail:
for every option that changes the routing, switching it off in desmoe's routers moves the logits
far beyond the bound on some sampled configuration (asserted below).
"""
from __future__ import annotations

import pytest
import torch

from hf_options import FAMILIES, NOT_ROUTING, OPTIONS, REFUSED, make_config, routing_fields, sample
from tolerance import bound

SEED = 1234
BATCH, SEQ = 2, 8


def _chain_terms(cfg) -> int:
    """Longest reduction chain of the forward: per layer norm, q/k/v, scores, attention x V, output,
    norm, expert up and down projections, router; then the LM head."""
    d = cfg.hidden_size
    widths = [getattr(cfg, n, 0) or 0 for n in ("intermediate_size", "moe_intermediate_size",
                                                 "shared_expert_intermediate_size")]
    shared = (getattr(cfg, "n_shared_experts", 0) or 0) * (getattr(cfg, "moe_intermediate_size", 0) or 0)
    return cfg.num_hidden_layers * (6 * d + SEQ + max(widths + [shared])) + d


def _mutations(block) -> list[tuple[str, callable]]:
    """(name, undo) for each routing option of this block that a wrong core could get wrong."""
    r, out = block.router, []

    def setter(obj, attr, value):
        old = getattr(obj, attr)
        setattr(obj, attr, value)
        return lambda: setattr(obj, attr, old)

    out.append(("top_k", lambda: setter(r, "k", r.k + 1 if r.k < r.num_experts else r.k - 1)))
    out.append(("renormalisation", lambda: setter(r, "normalize_topk", not r.normalize_topk)))
    if r.scaling != 1.0:
        out.append(("routed_scaling_factor", lambda: setter(r, "scaling", 1.0)))
    if r.num_groups > 1:
        out.append(("group_limited_topk", lambda: setter(r, "num_groups", 1)))
    if r.selection_bias is not None:
        out.append(("selection_bias", lambda: setter(r, "selection_bias", torch.zeros_like(r.selection_bias))))
    if block.shared is not None:
        out.append(("shared_experts", lambda: setter(block, "shared", None)))
    if block.shared_gate is not None:
        out.append(("shared_expert_gate", lambda: setter(block, "shared_gate", None)))
    expert = block.local_experts[0]
    if hasattr(expert, "limit"):
        def every_expert(attr, value):  # undo restores every local expert, not only the last
            undos = [setter(e, attr, value(e)) for e in block.local_experts]
            return lambda: [u() for u in undos]

        out.append(("swiglu_limit", lambda: every_expert("limit", lambda e: float("inf"))))
        out.append(("swiglu_alpha", lambda: every_expert("alpha", lambda e: 1.0 + e.alpha)))
    return out


def _layer_of(name: str) -> str:
    """Gradients are compared at the magnitude of their decoder layer's largest gradient: a router
    gradient is a sum of products of the same upstream gradient and activations as the layer's
    expert and attention gradients, and can cancel to rounding noise (top-1 renormalised: the
    weight is identically 1, its gradient 0 up to rounding), so its own maximum is no scale."""
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("model.layers.") else name


def _randomise(model) -> None:
    """Give the buffers/biases that transformers initialises to zero a non-zero value."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn_like(t) * 0.2)
            if name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
                t.copy_(torch.randn_like(t) * 0.3)


def _grads_as_hf(model, ep: int) -> dict:
    """desmoe's gradients under transformers' parameter names (experts gathered over EP)."""
    import deepspeed.comm as dist

    from desmoe.models.hf_moe import hf_state_dict
    from desmoe.moe import moe_blocks

    expert_ids = {id(p) for b in moe_blocks(model) for p in b.local_experts.parameters()}
    for p in model.parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if id(p) not in expert_ids or ep == 1:  # data-parallel sum; EP=2 experts already saw both ranks
            dist.all_reduce(g)
        p.data = g
    return hf_state_dict(model)


def family_on_ranks(family: str, root: str, seed: int) -> dict:
    import deepspeed.comm as dist
    from transformers import AutoModelForCausalLM

    from desmoe.errors import UserError
    from desmoe.models.hf_moe import load_hf_moe
    from desmoe.moe import moe_blocks

    rank = dist.get_rank()
    configs = sample(family, seed)
    result = {"checked": [], "refused": [], "sensitivity": {}}
    for i, options in enumerate(configs):
        path = f"{root}/{family}-{i}"
        cfg = make_config(family, options)
        if rank == 0:
            torch.manual_seed(seed * 1000 + i)
            ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            _randomise(ref)
            ref.save_pretrained(path)
        dist.barrier()
        try:
            load_hf_moe(path, ep_size=1)
        except UserError as err:
            msg = str(err)
            assert "\n" not in msg and "key '" in msg, msg
            result["refused"].append((options, msg))
            continue
        gen = torch.Generator().manual_seed(seed + i)
        ids = torch.randint(0, cfg.vocab_size, (2, BATCH, SEQ), generator=gen)
        probe = torch.randn(2, BATCH, SEQ, cfg.vocab_size, generator=gen)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
        want = ref(ids.flatten(0, 1)).logits.view(2, BATCH, SEQ, -1)
        (want * probe).sum().backward()
        want_grads = {n: p.grad for n, p in ref.named_parameters()}
        layer_scale: dict = {}
        for n, g in want_grads.items():
            top = float(g.abs().max()) if g.numel() else 0.0
            layer_scale[_layer_of(n)] = max(layer_scale.get(_layer_of(n), 0.0), top)
        want = want[rank].detach()
        terms = _chain_terms(cfg)
        grad_terms = 2 * terms + 2 * BATCH * SEQ
        scale_logits = float(want.abs().max())
        row = {"options": options}
        for ep in (1, 2):
            model = load_hf_moe(path, ep_size=ep).eval()
            got = model(ids[rank]).logits
            (got * probe[rank]).sum().backward()
            err = float((got.detach() - want).abs().max())
            row[f"logits_ep{ep}"] = err / bound(terms, scale=scale_logits)
            row[f"logits_rel_ep{ep}"] = err / scale_logits
            if ep == 1 and rank == 0:
                with torch.no_grad():
                    blocks = moe_blocks(model)
                    for name in dict.fromkeys(n for b in blocks for n, _ in _mutations(b)):
                        undo = [dict(_mutations(b))[name]() for b in blocks if name in dict(_mutations(b))]
                        moved = float((model(ids[rank]).logits - want).abs().max())
                        for u in undo:
                            u()
                        ratio = moved / bound(terms, scale=scale_logits)
                        result["sensitivity"][name] = max(result["sensitivity"].get(name, 0.0), ratio)
            grads = _grads_as_hf(model, ep)
            worst_ratio, worst_rel, worst_name = 0.0, 0.0, ""
            for name, g_want in want_grads.items():
                g_got = grads[name]
                scale = layer_scale[_layer_of(name)] or 1.0  # an all-zero layer: compare at unit magnitude
                e = float((g_got - g_want).abs().max()) if g_want.numel() else 0.0
                ratio = e / bound(grad_terms, scale=scale)
                if ratio > worst_ratio:
                    worst_ratio, worst_rel, worst_name = ratio, e / scale, name
            row[f"grads_ep{ep}"], row[f"grads_rel_ep{ep}"], row[f"grads_worst_ep{ep}"] = \
                worst_ratio, worst_rel, worst_name
        result["checked"].append(row)
    return result


def test_every_routing_field_is_enumerated():
    """The grids follow the config classes: a new routing field in transformers fails here."""
    for family in FAMILIES:
        refused = {k for bad in REFUSED[family] for k in bad}
        missing = [f for f in routing_fields(family) if f not in OPTIONS[family] and f not in NOT_ROUTING
                   and f not in refused]
        assert not missing, f"{family}: routing fields not enumerated: {missing}"
        unknown = [f for f in list(OPTIONS[family]) + sorted(refused) if f not in routing_fields(family)]
        assert not unknown, f"{family}: options that are not fields of the config class: {unknown}"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_option_parity(ranks, tmp_path, family):
    print(f"{family}: seed {SEED}, sample {sample(family, SEED)}")
    results = ranks.run(family_on_ranks, family, str(tmp_path), SEED)
    for r in results:
        assert r["checked"], f"{family}: every sampled configuration was refused"
        for row in r["checked"]:
            for key in ("logits_ep1", "logits_ep2", "grads_ep1", "grads_ep2"):
                assert row[key] <= 1.0, f"{family} {row['options']}: {key} error is {row[key]:.2f}x the bound {row}"
            for key in ("logits_rel_ep1", "logits_rel_ep2", "grads_rel_ep1", "grads_rel_ep2"):
                assert row[key] <= 1e-4, f"{family} {row['options']}: {key} = {row[key]:.2g} > 1e-4"
    # Every option of the sample that changes the routing was exercised: switching it off in
    # desmoe's routers breaks parity by far, so the comparisons above can fail.
    sens = results[0]["sensitivity"]
    weak = {k: v for k, v in sens.items() if v < 100}
    assert not weak, f"{family}: switching these off moved the logits less than 100x the bound: {weak}"
    worst = {key: max(row[key] for r in results for row in r["checked"])
             for key in results[0]["checked"][0] if key.startswith(("logits", "grads")) and "worst" not in key}
    print(f"{family}: {len(results[0]['checked'])} checked, {len(results[0]['refused'])} refused; worst "
          f"(error/bound, relative): {({k: f'{v:.3g}' for k, v in worst.items()})}; "
          f"option switched off (error/bound): {({k: f'{v:.0f}' for k, v in sens.items()})}")
    for options, msg in results[0]["refused"]:
        print(f"  refused {options}: {msg}")
    # Each value the core cannot reproduce was refused (one line naming the key, checked on the ranks).
    for bad in REFUSED[family]:
        hits = [msg for options, msg in results[0]["refused"] if all(options[k] == v for k, v in bad.items())]
        assert hits and any(f"key '{k}'" in m for m in hits for k in list(bad) + ["n_group", "topk_group",
                                                                                   "num_experts_per_tok"]), bad
