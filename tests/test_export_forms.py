"""The shipped modeling code (desmoe/models/export_modeling.py) on every supported family: a model with
DES-MoE's ALR on desmoe's blocks, written by ``desmoe.export.write_model`` and loaded back with
``from_pretrained(trust_remote_code=True)``, gives desmoe's logits (routing rule, selection bias, groups,
shared experts and gates, GPT-OSS's biased clamped experts and tuple-returning blocks); without the ALR
the same function writes the family's own class.  Single process; the 2-rank runs are in test_export.py."""
from __future__ import annotations

import pytest
import torch

from hf_tiny import ARCHS, save_tiny
from tolerance import bound, transformer_terms


def _model_and_parts(arch: str, tmp_path, alr: bool):
    from desmoe.models.hf_moe import EXPERT_KEY, MOE_ATTR, _gather_experts, load_hf_moe, moe_layer_ids
    from desmoe.recipes.des_moe.alr import alr_routers, install_alr
    from desmoe.recipes.des_moe.config import ALRConfig

    model = load_hf_moe(save_tiny(arch, tmp_path / f"{arch}-base"), ep_size=1).eval()
    if alr:
        install_alr(model, ALRConfig(hidden_mult=2))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a trained-looking ALR: the MLP moves the routing away from the teacher's
            for r in alr_routers(model):
                for p in (r.mlp_in.weight, r.mlp_in.bias, r.mlp_out.weight, r.mlp_out.bias):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    dense = {k: v for k, v in model.state_dict().items() if EXPERT_KEY not in k}
    experts = {i: _gather_experts(model.model.layers[i].mlp) for i in moe_layer_ids(model)}
    return model, getattr(model, MOE_ATTR)[1], dense, experts


@pytest.mark.parametrize("alr", [True, False], ids=["alr-shipped-code", "family-class"])
@pytest.mark.parametrize("arch", ARCHS)
def test_written_model_loads_with_desmoe_logits(tmp_path, arch, alr):
    from transformers import AutoModelForCausalLM

    from desmoe.export import write_model

    model, hf_cfg, dense, experts = _model_and_parts(arch, tmp_path, alr)
    num_experts = len(model.model.layers[sorted(experts)[0]].mlp.router.proj.weight)
    form = write_model(hf_cfg, dense, experts, tmp_path / arch, list(range(num_experts)))
    assert form == ("desmoe_moe" if alr else hf_cfg.model_type)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / arch), local_files_only=True,
                                                  **({"trust_remote_code": True} if alr else {})).eval()
    assert type(loaded).__name__.startswith("Desmoe") == alr
    ids = torch.randint(0, hf_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    terms = transformer_terms(hidden=hf_cfg.hidden_size, layers=hf_cfg.num_hidden_layers, seq=12, ffn=64,
                              heads=hf_cfg.num_attention_heads, top_k=3)
    err, tol = float((got - want).abs().max()), bound(terms, scale=float(want.abs().max()))
    assert err <= tol, f"{arch}: logits differ by {err:.3g} (bound {tol:.3g})"


def test_loading_the_shipped_form_without_remote_code_fails_loudly(tmp_path):
    from transformers import AutoModelForCausalLM

    from desmoe.export import write_model

    model, hf_cfg, dense, experts = _model_and_parts("mixtral", tmp_path, alr=True)
    write_model(hf_cfg, dense, experts, tmp_path / "m", list(range(4)))
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), local_files_only=True, trust_remote_code=False)


def test_lora_merged_into_bf16_weights_keeps_its_update_in_fp32():
    """W + s BA rounded to bf16 loses every update below half a step of W: a LoRA run exported from bf16
    weights was the base.  It is merged in fp32 and the whole model written in fp32 (one dtype to load)."""
    from desmoe.models.export_forms import merge_lora, merge_lora_exactly

    g = torch.Generator().manual_seed(0)
    w = (1 + torch.rand(8, 16, generator=g)).to(torch.bfloat16)  # |W| in [1, 2): a bf16 step of 2^-7
    a = (torch.randn(2, 16, generator=g) * 0.01).to(torch.bfloat16)
    b = (torch.randn(8, 2, generator=g) * 0.01).to(torch.bfloat16)  # |s BA| ~ 1e-3, below half a step
    dense = {"m.base_layer.weight": w, "m.lora_A.default.weight": a, "m.lora_B.default.weight": b,
             "norm.weight": torch.ones(16, dtype=torch.bfloat16)}
    experts = {1: {"gate_up": torch.ones(2, 4, 16, dtype=torch.bfloat16)}}
    want = w.float() + 2.0 * (b.float() @ a.float())
    assert torch.equal(merge_lora(dense, 2.0, "t")["m.weight"].float(), w.float())  # rounded to the base
    merged, wide_experts, widened = merge_lora_exactly(dense, experts, 2.0, "t")
    assert widened and torch.equal(merged["m.weight"], want)
    assert {t.dtype for t in merged.values()} == {torch.float32} == {wide_experts[1]["gate_up"].dtype}
    fp32 = {k: v.float() for k, v in dense.items()}  # fp32 weights are merged as they are
    assert merge_lora_exactly(fp32, experts, 2.0, "t")[2] is False
