"""Activation checkpointing (desmoe/recompute.py) on one process: with ``layers`` a training step gives the
same gradients and records the same state, bit for bit, as without, for the embedded model (gate noise,
selection-bias loads, an ALR router's distillation targets, a per-forward weight-gradient mask cleared right
after the forward, as DES-MoE does) and an HF family on the core; the guard is what makes it so; bad values
are refused in one line."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _model(mode: str):
    from desmoe.models.moe_lm import MoELM, MoELMConfig
    from desmoe.moe import moe_blocks
    from desmoe.recipes.des_moe.alr import install_alr
    from desmoe.recipes.des_moe.config import ALRConfig
    from desmoe.recompute import apply

    model = MoELM(MoELMConfig(hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32, num_experts=4, top_k=2,
                              ffn_size=32))
    model.setup_expert_parallel()
    install_alr(model, ALRConfig(), seed=0)
    for block in moe_blocks(model):
        r = block.router
        r.noise, r.noise_eps = "gaussian", 0.3  # a draw per forward: the recompute must draw the same
        r.register_buffer("selection_bias", torch.linspace(-0.01, 0.01, r.num_experts))
        r.bias_update_rate = 0.01
        r.lam = 0.5
    assert apply(model, mode) == (2 if mode == "layers" else 0)
    return model.train()


def _step(model, masked: bool = True):
    """One forward + backward as DES-MoE runs it: masks set before the forward, cleared right after."""
    from desmoe.moe import moe_blocks
    from desmoe.objective import lm_loss
    from desmoe.recipes.des_moe.alr import model_kd_loss
    from desmoe.recipes.des_moe.config import ALRConfig

    torch.manual_seed(1)
    ids = torch.randint(0, 256, (3, 17))
    blocks = moe_blocks(model)
    for b in blocks:
        if masked:
            b.weight_grad_mask = torch.arange(3 * 16 * 4).reshape(-1, 4) % 3 != 0
    loss, _ = lm_loss(model, ids, 0.01)
    for b in blocks:
        b.weight_grad_mask = None
    loss = loss + 0.5 * model_kd_loss(model, ALRConfig())
    recorded = {f"{i}.{k}": getattr(b, k) for i, b in enumerate(blocks) for k in ("aux_loss", "pending_load")}
    recorded.update({f"{i}.tokens": b.last_stats.tokens_per_expert for i, b in enumerate(blocks)})
    recorded.update({f"{i}.kd": b.router.kd_student for i, b in enumerate(blocks)})
    loss.backward()
    after = {f"{i}.{k}": getattr(b, k) for i, b in enumerate(blocks) for k in ("aux_loss", "pending_load")}
    after.update({f"{i}.tokens": b.last_stats.tokens_per_expert for i, b in enumerate(blocks)})
    after.update({f"{i}.kd": b.router.kd_student for i, b in enumerate(blocks)})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    same = all(after[k] is recorded[k] for k in recorded)  # the very objects the forward recorded
    return loss.detach(), grads, {k: v.detach().clone() for k, v in after.items()}, same


def test_layers_equal_none_bit_for_bit():
    loss0, g0, rec0, _ = _step(_model("none"))
    loss1, g1, rec1, same = _step(_model("layers"))
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    differ = [n for n in g0 if not torch.equal(g0[n], g1[n])]
    assert not differ, differ
    for k in rec0:  # recorded once, by the forward: the backward's recompute left no trace
        assert torch.equal(rec0[k], rec1[k]), k
    assert same


def test_broken_guard_is_noticed(monkeypatch):
    """With the replay made a no-op the recompute records a second time: the selection-bias loads double and
    the routing, counts and distillation targets left behind are the recompute's, not the forward's."""
    from desmoe import recompute

    _, g0, rec0, _ = _step(_model("none"))
    monkeypatch.setattr(recompute._Replay, "__enter__", lambda self: None)
    monkeypatch.setattr(recompute._Replay, "__exit__", lambda self, *exc: None)
    _, g1, rec1, same = _step(_model("layers"))
    assert not same
    assert torch.equal(rec1["0.pending_load"], 2 * rec0["0.pending_load"])


def test_hf_family_equal(tmp_path):
    from hf_tiny import save_tiny

    from desmoe.models.hf_moe import load_hf_moe
    from desmoe.recompute import apply

    path = save_tiny("qwen2_moe", tmp_path / "ckpt")
    out = {}
    for mode in ("none", "layers"):
        model = load_hf_moe(path).train()
        model.config.attention_dropout = 0.0
        assert apply(model, mode) == (2 if mode == "layers" else 0)
        torch.manual_seed(0)
        ids = torch.randint(0, 96, (2, 12))
        loss = model(ids, labels=ids).loss
        loss.backward()
        out[mode] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(out["none"][0], out["layers"][0])
    assert out["none"][1].keys() == out["layers"][1].keys()
    assert all(torch.equal(out["none"][1][n], out["layers"][1][n]) for n in out["none"][1])
    assert model.config.use_cache is False  # a KV cache would be appended to by the recompute again


def test_a_run_may_resume_with_the_other_mode():
    from desmoe.checkpoint import RESUMABLE_KEYS, _changed

    assert _changed({"train.activation_checkpointing": "none"}, {"train.activation_checkpointing": "layers"},
                    RESUMABLE_KEYS) == ""


def test_bad_values_refused_in_one_line():
    from desmoe.config import load_config
    from desmoe.errors import ConfigError
    from desmoe.recipes.lm.pretrain import PretrainExperiment
    from desmoe.recipes.lm.recipe import LMExperiment
    from desmoe.recompute import apply

    for cls in (LMExperiment, PretrainExperiment):  # TRGE: test_trge_recompute.py
        with pytest.raises(ConfigError) as err:
            load_config(cls, None, ["train.activation_checkpointing=blocks"])
        assert str(err.value) == ("defaults: key 'train.activation_checkpointing': expected one of 'none', "
                                  "'layers', got 'blocks'")
        assert load_config(cls, None, ["train.activation_checkpointing=layers"]).train.activation_checkpointing \
            == "layers"
    with pytest.raises(ConfigError, match="key 'train.activation_checkpointing': 'layers' needs decoder layers"):
        apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), "layers")
