"""The LoRA baseline finds the attention projections of every supported HF family (never the experts),
and starts as the base model (peft's B = 0)."""
import pytest
import torch

from hf_tiny import save_tiny


@pytest.mark.parametrize("arch", ["deepseek_v2", "mixtral"])
def test_lora_adapts_attention_of_hf_models(arch, tmp_path):
    from desmoe.recipes.des_moe.baselines import build_method
    from desmoe.recipes.des_moe.config import DESMoEConfig
    from desmoe.models.hf_moe import load_hf_moe

    model = load_hf_moe(save_tiny(arch, tmp_path / arch, seed=3)).eval()
    ids = torch.randint(0, 96, (2, 12))  # shape test only
    with torch.no_grad():
        before = model(ids).logits
    parts = build_method(DESMoEConfig(method="lora"), 10, 2, aux_coef=0.01).prepare_model(model)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if parts["lora"](n)}
    expected = {"kv_b_proj", "o_proj"} if arch == "deepseek_v2" else {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert expected <= adapted, adapted
    assert not any("expert" in n and parts["lora"](n) for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
