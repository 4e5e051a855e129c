"""DES-MoE (ALR, DGES, schedule), ESFT-Token/-Gate and LoRA on every supported HF family: tiny
checkpoints on 2 real ranks, EP=2, ZeRO-2, a few steps across the three phases.  Each method must
train (finite losses, its trainable parameters move, frozen ones stay bit-identical); the
DeepSeek-V3/GLM-4.5 selection bias follows the auxiliary-loss-free rule when asked to, and stays
the checkpoint's when not; the ALR starts as the pretrained router on every family."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_options import FAMILIES, make_config
from tolerance import bound

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # warm-up 1, stabilisation 2-4, consolidation 5-6 (DES-MoE's schedule)
METHODS = ("desmoe", "esft_token", "esft_gate", "lora")
# One legitimate configuration per family with its distinctive routing switched on.
OPTIONS = {
    "mixtral": dict(num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts_per_tok=2, norm_topk_prob=False, shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0]),
    "olmoe": dict(num_experts_per_tok=1, norm_topk_prob=True),
    "deepseek_v2": dict(num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1),
    "deepseek_v3": dict(num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        n_shared_experts=1, first_k_dense_replace=1),
    "glm4_moe": dict(num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1),
    "gpt_oss": dict(num_experts_per_tok=2, swiglu_limit=0.5),
}


def _checkpoint(family: str, path: str, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, dict(OPTIONS[family], vocab_size=256)))
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn_like(t) * 0.2)
    model.save_pretrained(path)
    return path


def methods_case(family: str, root: str) -> dict:
    import deepspeed.comm as dist

    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.recipes.des_moe.baselines import build_method
    from desmoe.recipes.des_moe.config import DESMoEConfig
    from desmoe.recipes.des_moe.domains import DomainDataConfig, StdlibDomains
    from desmoe.models.hf_moe import load_hf_moe
    from desmoe.moe import update_selection_biases

    rank, world = dist.get_rank(), dist.get_world_size()
    path = f"{root}/{family}"
    if rank == 0:
        _checkpoint(family, path)
    dist.barrier()
    data = StdlibDomains(DomainDataConfig(domains=["email", "xml"], general=["json"], max_bytes_per_domain=20_000))
    out = {}
    for name in METHODS:
        cfg = DESMoEConfig(method=name)
        cfg.dges.update_every = 2
        cfg.baseline.esft_profile_tokens = 256
        # ESFT keeps the pretrained router (the ALR does not carry the bias yet, see _ALR_GAP).
        rate = 1e-2 if name == "esft_token" and family in ("deepseek_v3", "glm4_moe") else 0.0
        model = load_hf_moe(path, ep_size=2, bias_update_rate=rate)
        method = build_method(cfg, STEPS, 2, aux_coef=0.01)
        parts = method.prepare_model(model)
        ds = resolve_ds_config(read_ds_config(ROOT / "configs/zero2.json"), micro_batch=2, lr=1e-2)
        engine, train = build_engine(model, ds, parts=parts)
        method.attach(engine.module, train, data, rank, world, 2, 16)
        streams = [data.batches("train", 2, 16, 0, rank, world, 0, domains=[d]) for d in data.domains]
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        biases = [b.detach().clone() for n, b in engine.module.named_buffers() if n.endswith("selection_bias")]
        losses, loads = [], []
        for step in range(STEPS):
            domain = step % 2
            batch = next(streams[domain])
            method.begin_step(step, domain)
            loss, parts_ = method.loss(batch.input_ids, batch.token_domain[:, :-1])
            engine.backward(loss)
            engine.step()
            method.end_step(step, batch.token_domain[:, :-1])
            if rate:  # what the trainer does after each optimizer step when the bias is to follow the load
                loads.append(torch.stack([b.pending_load.clone() for b in _blocks(engine.module)]))
                update_selection_biases(engine.module)
            losses.append(float(parts_["task_loss"]))
        moved = sorted(n for n, p in engine.module.named_parameters() if not torch.equal(before[n], p.detach()))
        after = [b.detach().clone() for n, b in engine.module.named_buffers() if n.endswith("selection_bias")]
        if loads:  # the rule, recomputed here from the loads summed over both ranks
            total = torch.stack(loads)
            dist.all_reduce(total)
            want = [b + rate * torch.sign(t.mean(-1, keepdim=True) - t).sum(0)
                    for b, t in zip(biases, total.unbind(1))]
            out[f"{name}/bias_rule"] = max(float((a - w).abs().max()) for a, w in zip(after, want))
            out[f"{name}/bias_scale"] = max(float(w.abs().max()) for w in want)
            out[f"{name}/bias_moved"] = any(not torch.equal(a, b) for a, b in zip(after, biases))
        else:
            out[f"{name}/bias_fixed"] = all(torch.equal(a, b) for a, b in zip(after, biases))
        out[f"{name}/losses"] = losses
        out[f"{name}/moved"] = moved
        out[f"{name}/all"] = sorted(before)
        del engine, model
    return out


def _blocks(model):
    from desmoe.moe import moe_blocks

    return [b for b in moe_blocks(model) if b.router.bias_update_rate]


@pytest.mark.parametrize("family", FAMILIES)
def test_methods_train_on_family(ranks, tmp_path, family):
    results = ranks.run(methods_case, family, str(tmp_path))
    r0 = results[0]
    for name in METHODS:
        losses = r0[f"{name}/losses"]
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        moved = sorted(set().union(*(r[f"{name}/moved"] for r in results)))  # EP=2: each rank its experts
        assert moved, f"{family}/{name}: nothing trained"
        if name == "lora":  # only adapters train
            assert all("lora_" in n for n in moved), [n for n in moved if "lora_" not in n][:5]
        if name.startswith("esft"):  # only experts train
            assert all("expert" in n for n in moved), [n for n in moved if "expert" not in n][:5]
            frozen = [n for n in r0[f"{name}/all"] if "expert" in n and n not in moved]
            assert len(frozen) + len([n for n in moved if "expert" in n]) > 0
        if name == "desmoe":  # the ALR trains, its frozen teacher never moves
            assert any(".router.mlp_" in n for n in moved), moved[:5]
            assert not any(".router.proj." in n for n in moved)
    if family in ("deepseek_v3", "glm4_moe"):
        for r in results:
            # a sum of STEPS +-rate steps onto the checkpoint's bias, in fp32
            assert r["esft_token/bias_moved"], r
            assert r["esft_token/bias_rule"] <= bound(STEPS, scale=r["esft_token/bias_scale"]), r
            assert r["esft_gate/bias_fixed"] and r["lora/bias_fixed"]


def alr_start_case(family: str, root: str) -> float:
    import deepspeed.comm as dist

    from desmoe.recipes.des_moe.alr import install_alr
    from desmoe.recipes.des_moe.config import ALRConfig
    from desmoe.models.hf_moe import load_hf_moe

    path = f"{root}/{family}"
    if dist.get_rank() == 0:
        _checkpoint(family, path)
    dist.barrier()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    model = load_hf_moe(path, ep_size=2).eval()
    with torch.no_grad():
        want = model(ids).logits
        install_alr(model, ALRConfig())  # the residual reading: teacher logits + a zero-initialised MLP
        got = model(ids).logits
    return float((got - want).abs().max())


# AdaptiveRouter.from_linear carries the pretrained router's whole selection rule: score function,
# renormalisation, scaling, group limit and group score, and the selection bias.
@pytest.mark.parametrize("family", FAMILIES)
def test_alr_starts_as_the_pretrained_router(ranks, tmp_path, family):
    for err in ranks.run(alr_start_case, family, str(tmp_path)):  # teacher + 0: bit-identical routing
        assert err == 0.0, f"{family}: the ALR at step 0 changes the logits by {err:.3g}"


def trainer_bias_case(root: str, base: str, rate: float) -> dict:
    """A DES-MoE-recipe run (FFT baseline, 3 steps, EP=2) through the Trainer; the routers' final biases."""
    from test_desmoe_ranks import trainer_case

    trainer_case(root, 3, "fft", (f"base.hf={base}", f"base.bias_update_rate={rate}", "train.save_every=3",
                                  f"run.name=fft-{rate}"))
    tag = (Path(root) / f"fft-{rate}" / "checkpoints" / "latest").read_text().strip()
    state = torch.load(Path(root) / f"fft-{rate}" / "checkpoints" / tag / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    return {k: v for k, v in state.items() if k.endswith("selection_bias")}


def test_trainer_applies_the_bias_rule_only_when_asked(ranks, tmp_path):
    from safetensors.torch import load_file

    base = _checkpoint("deepseek_v3", str(tmp_path / "base"))
    start = [v for k, v in sorted(load_file(str(Path(base) / "model.safetensors")).items())
             if k.endswith("e_score_correction_bias")]
    for rate, moves in ((0.0, False), (0.05, True)):
        final = ranks.run(trainer_bias_case, str(tmp_path), base, rate)[0]
        assert len(final) == len(start) > 0
        for (name, got), want in zip(sorted(final.items()), start):
            assert torch.equal(got, want) != moves, (rate, name)
            if moves:  # three steps of +-rate per expert
                steps = ((got - want) / rate).round()
                assert steps.abs().max() <= 3
                # three fp32 additions to the bias, then the difference: rounding only
                tol = bound(5, scale=float(want.abs().max()) + 3 * rate)
                assert float((got - want - steps * rate).abs().max()) <= tol
