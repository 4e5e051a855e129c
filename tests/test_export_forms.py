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
