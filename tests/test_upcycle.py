"""Sparse upcycling reproduces the dense model before any training (both modes),
as a transformers Mixtral and on desmoe's EP blocks."""
import pytest
import torch

from tolerance import assert_close, transformer_terms


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.2)
    path = tmp_path_factory.mktemp("dense") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("mode,experts,top_k", [("copy", 4, 2), ("segment", 4, 4)])
def test_upcycled_equals_dense(dense, tmp_path, mode, experts, top_k):
    from transformers import AutoModelForCausalLM

    from desmoe.models.hf_moe import load_hf_moe
    from desmoe.models.upcycle import upcycle
    from desmoe.moe import moe_blocks

    out = upcycle(dense, tmp_path / "moe", num_experts=experts, top_k=top_k, mode=mode)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32, local_files_only=True).eval()(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True).eval()
        assert type(hf).__name__ == "MixtralForCausalLM"
        terms = transformer_terms(hidden=32, layers=2, seq=10, ffn=48, heads=4, top_k=top_k)  # the dense model's
        assert_close(hf(ids).logits, want, terms=terms, msg="transformers Mixtral")
        ours = load_hf_moe(out).eval()
        assert_close(ours(ids).logits, want, terms=terms, msg="desmoe EP block")
    experts_w = [e.gate_up.weight for e in moe_blocks(ours)[0].local_experts]
    distinct = not torch.equal(experts_w[0], experts_w[1])
    assert distinct == (mode == "segment")  # copies are identical, segments are slices
    if mode == "copy":  # a random router already spreads tokens over the experts
        assert (moe_blocks(ours)[0].last_stats.tokens_per_expert > 0).sum() > 2


def test_segment_with_fewer_active_differs(dense, tmp_path):
    """The check above can fail: with top_k < E a segment MoE is not the dense model."""
    from transformers import AutoModelForCausalLM

    from desmoe.models.upcycle import upcycle

    out = upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, mode="segment")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32, local_files_only=True)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True)(ids).logits
    assert (got - want).abs().max() > 1e-2


def test_upcycle_bad_inputs(tmp_path):
    from desmoe.errors import UserError
    from desmoe.models.upcycle import upcycle
    from hf_tiny import save_tiny

    moe = save_tiny("olmoe", tmp_path / "olmoe")
    with pytest.raises(UserError, match="cannot upcycle architecture 'olmoe'"):
        upcycle(moe, tmp_path / "x", num_experts=4, top_k=2)
    with pytest.raises(UserError, match="not a Hugging Face checkpoint"):
        upcycle(tmp_path, tmp_path / "x", num_experts=4, top_k=2)


@pytest.mark.parametrize("shared", [False, True])
def test_tied_config_with_its_own_dense_head_is_refused(dense, tmp_path, shared):
    """config.json ties but the file holds a different lm_head: transformers 5 keeps that head untied, so
    the dense model uses it; the upcycled MoE tied it to the embedding (measured on a tiny Llama: logits off by 8,
    no error) before the refusal.  An equal stored head is tied and upcycles as before."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from desmoe.errors import UserError
    from desmoe.models.upcycle import upcycle
    from desmoe.models.upcycle_shared import upcycle_shared

    def run(src, out):
        if shared:
            return upcycle_shared(src, out, num_experts=4, top_k=2, shared_ffn=16, router="zero")
        return upcycle(src, out, num_experts=4, top_k=2)

    src = shutil.copytree(dense, tmp_path / "dense")
    state = load_file(src / "model.safetensors")
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] and "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.5
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(UserError) as err:
        run(src, tmp_path / "moe")
    msg = str(err.value)
    assert "\n" not in msg and "config.json" in msg and "'tie_word_embeddings'" in msg, msg
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(src / "model.safetensors"))
    assert run(src, tmp_path / "moe").is_dir()
