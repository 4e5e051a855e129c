"""DeepSeek-style upcycling (fine-grained routed experts + a shared expert, written as qwen2_moe):
exact with every expert active, and with top-k < E the fitted router loses less than no router."""
import pytest
import torch

from tolerance import assert_close, transformer_terms

VOCAB, HIDDEN, FFN = 96, 32, 48


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.2)
    path = tmp_path_factory.mktemp("dense") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _ids(seed: int, batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("calibrated", [False, True])
def test_all_experts_active_equals_dense(dense, tmp_path, calibrated):
    """Zero router, k = E = 4: shared (x2 for the sigmoid(0) gate) + routed (x k, weights 1/k) = the MLP."""
    from desmoe.models.hf_moe import load_hf_moe
    from desmoe.models.upcycle_shared import upcycle_shared
    from desmoe.moe import moe_blocks

    calib = _ids(5, 4, 16) if calibrated else None  # calibration only regroups the neurons here
    out = upcycle_shared(dense, tmp_path / "moe", num_experts=4, top_k=4, shared_ffn=16, router="zero",
                         calib_ids=calib)
    ids = _ids(1)
    with torch.no_grad():
        want = _load(dense)(ids).logits
        hf = _load(out)
        assert type(hf).__name__ == "Qwen2MoeForCausalLM" and hf.config.qkv_bias is False
        terms = transformer_terms(hidden=HIDDEN, layers=2, seq=10, ffn=FFN, heads=4, top_k=4)
        assert_close(hf(ids).logits, want, terms=terms, msg="transformers qwen2_moe")
        ours = load_hf_moe(out).eval()
        assert_close(ours(ids).logits, want, terms=terms, msg="desmoe EP block")
    block = moe_blocks(ours)[0]
    assert block.shared is not None and len(block.local_experts) == 4
    assert not torch.equal(block.local_experts[0].gate_up.weight, block.local_experts[1].gate_up.weight)


def _mlp_gap(dense_path, moe_path, ids) -> float:
    """Relative error of layer 0's MLP output on the dense model's own MLP inputs."""
    from desmoe.models.upcycle_shared import mlp_inputs

    dense_model, moe = _load(dense_path), _load(moe_path)
    x = mlp_inputs(dense_model, ids)[0]
    with torch.no_grad():
        want = dense_model.model.layers[0].mlp(x)
        got = moe.model.layers[0].mlp(x[None])[0]
    return ((got - want).norm() / want.norm()).item()


def test_fitted_router_beats_no_router(dense, tmp_path):
    """k = 2 of 4: some neurons are dropped per token; choosing them by the fitted router must lose
    less of the dense MLP than a fixed choice (zero router), on tokens the fit did not see."""
    from desmoe.models.upcycle_shared import upcycle_shared

    calib, test = _ids(5, 8, 32), _ids(6, 4, 32)
    fit = upcycle_shared(dense, tmp_path / "fit", num_experts=4, top_k=2, shared_ffn=16, router="fit",
                         calib_ids=calib)
    zero = upcycle_shared(dense, tmp_path / "zero", num_experts=4, top_k=2, shared_ffn=16, router="zero",
                          calib_ids=calib)
    gap_fit, gap_zero = _mlp_gap(dense, fit, test), _mlp_gap(dense, zero, test)
    print(f"layer-0 MLP relative gap: fitted router {gap_fit:.3f}, zero router {gap_zero:.3f}")
    assert 0 < gap_fit < gap_zero, (gap_fit, gap_zero)
    # the fitted router's weights over the k chosen stay near-uniform, so a chosen expert keeps its share
    w = _load(fit).model.layers[0].mlp.gate.weight
    assert 0 < w.abs().max() and (w @ torch.randn(HIDDEN, 64)).std() < 1


def test_balanced_groups_are_a_partition():
    from desmoe.models.upcycle_shared import balanced_groups

    feats = torch.randn(24, 5, generator=torch.Generator().manual_seed(0))
    order = balanced_groups(feats, 4)
    assert sorted(order.tolist()) == list(range(24))
    # two obvious clusters of equal size are found exactly
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feats = torch.stack([a if i % 2 else b for i in range(10)]) + 0.01 * torch.randn(10, 2)
    groups = balanced_groups(feats, 2).view(2, -1)
    assert {tuple(sorted(i % 2 for i in g.tolist())) for g in groups} == {(0,) * 5, (1,) * 5}


def test_bad_inputs(dense, tmp_path):
    from desmoe.errors import UserError
    from desmoe.models.upcycle_shared import upcycle_shared

    with pytest.raises(UserError, match="5 experts do not divide the 32 routed neurons"):
        upcycle_shared(dense, tmp_path / "x", num_experts=5, top_k=2, shared_ffn=16, router="zero")
    with pytest.raises(UserError, match="shared_ffn 48 must be in 1..47"):
        upcycle_shared(dense, tmp_path / "x", num_experts=4, top_k=2, shared_ffn=48, router="zero")
    with pytest.raises(UserError, match="router 'fit' needs calibration"):
        upcycle_shared(dense, tmp_path / "x", num_experts=4, top_k=2, shared_ffn=16, router="fit")
