"""HF MoE checkpoints on desmoe's EP block: same logits as transformers at EP=1 and EP=2
(2 real gloo ranks), export back to HF bit-identical, clear errors on bad input."""
import types

import pytest
import torch

from hf_tiny import ARCHS, save_tiny, tiny_config

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_tiny(arch, root / arch, seed=i) for i, arch in enumerate(ARCHS)}


def _tokens(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def parity_on_ranks(path: str, export_dir: str) -> dict:
    import deepspeed.comm as dist
    from transformers import AutoModelForCausalLM

    from desmoe.models.hf_moe import export_hf, load_hf_moe
    from desmoe.moe import moe_blocks

    rank = dist.get_rank()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    ids = _tokens(ref.config.vocab_size, seed=rank)  # each rank its own tokens
    with torch.no_grad():
        want = ref(ids).logits
        result = {}
        for ep in (1, 2):
            model = load_hf_moe(path, ep_size=ep).eval()
            got = model(ids).logits
            result[f"ep{ep}"] = (got - want).abs().max().item()
            blocks = moe_blocks(model)
            n_local = blocks[0].num_experts // ep
            mine = range(rank * n_local, (rank + 1) * n_local) if ep > 1 else range(n_local)
            assert all(len(b.local_experts) == n_local and b.local_global_ids() == mine for b in blocks)
            # Every expert of every block was used by somebody, so every expert's weights were checked.
            used = torch.stack([b.last_stats.tokens_per_expert for b in blocks])
            dist.all_reduce(used)
            result[f"unused{ep}"] = int((used == 0).sum())
        export_hf(model, export_dir)  # from the EP=2 model: experts gathered from both ranks
        back = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, local_files_only=True).eval()
        result["export_identical"] = torch.equal(back(ids).logits, want)
        result["export_weights_identical"] = all(torch.equal(a, b) for a, b in
                                                 zip(ref.state_dict().values(), back.state_dict().values()))
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_and_export(ranks, checkpoints, tmp_path, arch):
    results = ranks.run(parity_on_ranks, str(checkpoints[arch]), str(tmp_path / "export"))
    for r in results:
        assert r["ep1"] < TOL and r["ep2"] < TOL, r
        assert r["export_identical"] and r["export_weights_identical"], r
    assert results[0]["unused2"] == 0, "tiny routing should reach every expert"


def test_fused_layout_on_disk(tmp_path):
    """Checkpoints holding fused expert tensors (transformers-5 in-memory names) load too."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from desmoe.models.hf_moe import load_hf_moe

    torch.manual_seed(3)
    ref = AutoModelForCausalLM.from_config(tiny_config("qwen2_moe"), dtype=torch.float32).eval()
    ref.config.save_pretrained(str(tmp_path))
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    ids = _tokens(ref.config.vocab_size, 0)
    with torch.no_grad():
        assert (load_hf_moe(tmp_path).eval()(ids).logits - ref(ids).logits).abs().max() < TOL


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(tmp_path, checkpoints):
    from transformers import LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from desmoe.errors import UserError
    from desmoe.models.hf_moe import check_tokenizer, load_hf_moe

    with pytest.raises(UserError) as err:
        load_hf_moe(tmp_path)
    assert "not a Hugging Face checkpoint" in _one_line(err)
    with pytest.raises(UserError) as err:
        load_hf_moe(tmp_path / "missing")
    assert "not a directory" in _one_line(err)
    LlamaConfig(vocab_size=32, hidden_size=16, num_attention_heads=2, num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError) as err:
        load_hf_moe(tmp_path / "llama")
    msg = _one_line(err)
    assert "unsupported architecture 'llama'" in msg and all(a in msg for a in ARCHS)
    with pytest.raises(UserError) as err:
        load_hf_moe(checkpoints["mixtral"], ep_size=3)
    assert "ep_size 3 does not divide" in _one_line(err) and "4 experts" in str(err.value)
    vocab = {f"t{i}": i for i in range(200)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    with pytest.raises(UserError) as err:
        check_tokenizer(tok, tiny_config("olmoe"), "my_tokenizer")
    assert "200 tokens" in _one_line(err) and "vocab_size is 96" in str(err.value)
    cfg = tiny_config("olmoe")
    cfg.eos_token_id, cfg.bos_token_id = 3, 1
    wrapper = types.SimpleNamespace(vocab_size=50, eos_id=7, bos_id=1)  # like desmoe.data's tokenizers
    with pytest.raises(UserError) as err:
        check_tokenizer(wrapper, cfg, "data/demo/tokenizer")
    assert "eos id 7 differs from the checkpoint's 3" in _one_line(err)
    check_tokenizer(types.SimpleNamespace(vocab_size=50, eos_id=3, bos_id=1), cfg)  # a matching one passes


def test_top1_upcycled_copy_equals_dense(tmp_path):
    """Mixtral renormalises top-1 to a weight of exactly 1, so a copy-upcycled top-1 MoE is the dense
    model for any router; desmoe's blocks renormalised only for k >= 2 before, which scaled every
    layer's MLP output by the chosen expert's softmax score (about 1/E)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from desmoe.models.hf_moe import load_hf_moe
    from desmoe.models.upcycle import upcycle
    from tolerance import assert_close

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "dense"))
    out = upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=1, mode="copy", router_std=0.5)
    ids = _tokens(96, 0)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), local_files_only=True).eval()(ids).logits
        got = load_hf_moe(out).eval()(ids).logits
    assert_close(got, want, terms=2 * (6 * 32 + 11 + 48) + 32)
