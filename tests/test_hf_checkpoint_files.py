"""Checkpoint folders as users bring them: which files are the model, quantised weights, tied embeddings
with their own head, tensors whose shapes contradict config.json.  Each either loads and reproduces
``from_pretrained`` on the same folder, or is refused in one line naming the file and the key."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_options import make_config
from hf_tiny import ARCHS, save_tiny
from tolerance import assert_close

SEQ = 11


def _terms(cfg, seq: int) -> int:  # the fp32 reduction chain, as tests/test_hf_options.py counts it
    widths = [getattr(cfg, n, 0) or 0 for n in ("intermediate_size", "moe_intermediate_size")]
    return cfg.num_hidden_layers * (6 * cfg.hidden_size + seq + max(widths)) + cfg.hidden_size


def _same_as_transformers(path, seq: int = SEQ) -> None:
    from transformers import AutoModelForCausalLM

    from desmoe.models.hf_moe import load_hf_moe

    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(load_hf_moe(path).eval()(ids).logits, ref(ids).logits, terms=_terms(ref.config, seq))


def _refused(path, *fragments) -> str:
    from desmoe.errors import UserError
    from desmoe.models.hf_moe import load_hf_moe

    with pytest.raises(UserError) as err:
        load_hf_moe(path)
    msg = str(err.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("hf") / "qwen3_moe", seed=5)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_only_the_files_transformers_reads_are_the_model(qwen3, tmp_path):
    """A stray ``*.safetensors`` beside the model (an older copy, a stale shard) holding the same keys
    with other values: transformers reads ``model.safetensors`` (or the index's files) only.  Before the
    fix desmoe globbed every file and the stray one's values won (74 at logits of magnitude 6)."""
    state = load_file(qwen3 / "model.safetensors")
    stray = {k: v + 1 for k, v in state.items()}
    single = _copy(qwen3, tmp_path / "single")
    save_file(stray, str(single / "model_old.safetensors"))
    _same_as_transformers(single)

    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(qwen3), dtype=torch.float32).save_pretrained(
        str(sharded), max_shard_size="20KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    _same_as_transformers(sharded)
    save_file(stray, str(sharded / "model-99999-of-99999.safetensors"))  # not in the index
    _same_as_transformers(sharded)

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[0]
    (sharded / gone).unlink()
    _refused(sharded, "model.safetensors.index.json", "'weight_map'", gone)

    pickled = _copy(qwen3, tmp_path / "pickled")  # .bin (pickle) weights only
    torch.save(state, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    _refused(pickled, str(pickled), "pytorch_model.bin", "model.safetensors")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", [{"quant_method": "fp8", "weight_block_size": [128, 128]},
                                   {"quant_method": "mxfp4"}, {"quant_method": "gptq", "bits": 4}])
def test_quantised_checkpoints_are_refused(tmp_path, arch, quant):
    """Quantised weights would be read as plain tensors with their scales ignored (FP8's
    ``weight_scale_inv``: silently wrong logits; before the fix only gpt_oss refused, and only MXFP4)."""
    cfg = make_config(arch, {})
    cfg.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "quantization_config": quant}))
    _refused(tmp_path, "config.json", "'quantization_config'", quant["quant_method"])


def test_fp8_weights_with_scales_would_differ(qwen3, tmp_path):
    """The reason for the refusal, measured: transformers dequantises FP8 weights with their scales
    (on CPU to bf16), so the scale matters; desmoe refuses rather than load the unscaled values."""
    from transformers import AutoModelForCausalLM

    path = _copy(qwen3, tmp_path / "fp8")
    state = load_file(path / "model.safetensors")
    out = {}
    for k, v in state.items():
        if k.startswith("model.layers.") and k.endswith("_proj.weight") and ".experts." not in k:
            out[k] = (v / 2).to(torch.float8_e4m3fn)
            out[k[:-len("weight")] + "weight_scale_inv"] = torch.full((1, 1), 2.0)
        else:
            out[k] = v
    save_file(out, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(cfg))
    _refused(path, "'quantization_config'", "fp8")
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    w = ref.model.layers[0].self_attn.q_proj.weight.float()
    stored = (state["model.layers.0.self_attn.q_proj.weight"] / 2).to(torch.float8_e4m3fn).float()
    assert torch.equal(w, stored * 2) and not torch.equal(w, stored)  # x2 is exact in fp8 -> bf16 -> fp32


def test_tied_config_with_its_own_lm_head(qwen3, tmp_path):
    """config.json ties the embeddings but the file holds an lm_head: transformers 5 keeps the
    checkpoint's head when it differs (and ties when equal).  Before the fix desmoe tied regardless:
    logits off by 9 at magnitude 6."""
    tied = _copy(qwen3, tmp_path / "tied")
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    _refused(tied, "config.json", "'tie_word_embeddings'", "lm_head.weight")
    state = load_file(tied / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tied / "model.safetensors"))
    _same_as_transformers(tied)  # equal head: tied, as transformers does


def test_tensor_shapes_must_match_config(qwen3, tmp_path):
    """A tensor of another shape than config.json implies: transformers refuses (size mismatch).  Before
    the fix desmoe broadcast a [1] norm weight silently and failed on other shapes without a key."""
    small = _copy(qwen3, tmp_path / "norm")
    state = load_file(small / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"][:1].contiguous()
    save_file(state, str(small / "model.safetensors"))
    _refused(small, "'model.norm.weight'", "expected shape [32]", "got [1]")
    wide = _copy(qwen3, tmp_path / "width")
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 8}))
    _refused(wide, "'model.layers.0.mlp.experts.0", "expected shape [16, 32]", "got [32, 32]")
    router = _copy(qwen3, tmp_path / "router")
    state = load_file(router / "model.safetensors")
    state["model.layers.1.mlp.gate.weight"] = state["model.layers.1.mlp.gate.weight"][:, :1].contiguous()
    save_file(state, str(router / "model.safetensors"))
    _refused(router, "'model.layers.1.mlp.gate.weight'", "expected shape [8, 32]")


@pytest.mark.parametrize("edit,fragments", [
    (dict(num_experts_per_tok=None), ("'num_experts_per_tok'", "expected int", "None")),
    (dict(decoder_sparse_step="2"), ("'decoder_sparse_step'", "expected int", "'2'")),
    (dict(model_type="my_moe", auto_map={"AutoConfig": "configuration_my.MyConfig"}), ("custom code",)),
])
def test_unloadable_configs_are_one_line_without_a_prompt(qwen3, tmp_path, monkeypatch, edit, fragments):
    """transformers 5 validates config field types with an error that is not a ValueError and spans
    lines (it escaped as a traceback before); an ``auto_map`` of an unknown architecture made
    transformers ask on stdin whether to run the folder's code (every rank, in a training job)."""
    import builtins

    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *a: prompts.append(a) or "n")
    path = _copy(qwen3, tmp_path / "cfg")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **edit}))
    _refused(path, "config.json", "not a loadable Hugging Face config", *fragments)
    assert not prompts


def _rope_variants(half: int) -> dict[str, dict]:
    """Every rope type transformers implements (``ROPE_INIT_FUNCTIONS``), with parameters that take
    effect at the tested length (original length 16 < 40 tokens; dynamic beyond max_position 64)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    orig = dict(original_max_position_embeddings=16)
    variants = {"default": {}, "linear": dict(factor=2.0), "dynamic": dict(factor=2.0),
                "yarn": dict(orig, factor=4.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5),
                "llama3": dict(orig, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
                "longrope": dict(orig, short_factor=[1.0 + i / half for i in range(half)],
                                 long_factor=[2.0 + i / half for i in range(half)]),
                "proportional": dict(partial_rotary_factor=0.5)}
    assert set(ROPE_INIT_FUNCTIONS) <= set(variants), f"a new rope type to enumerate: {set(ROPE_INIT_FUNCTIONS)}"
    return {name: {"rope_type": name, "rope_theta": 10000.0, **kw} for name, kw in variants.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_rope_type_reproduces_transformers(tmp_path, arch):
    """The rotary module is the model's own, but its non-persistent buffers (inv_freq, original_inv_freq)
    are rebuilt by desmoe after the meta build (``restore_buffers``): each rope type, at lengths where its
    scaling acts (dynamic: 80 tokens > max_position_embeddings 64), against from_pretrained."""
    from transformers import AutoModelForCausalLM

    from hf_tiny import tiny_config

    def config():
        cfg = tiny_config(arch)
        cfg.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # Mixtral: None
        return cfg

    with torch.device("meta"):
        half = AutoModelForCausalLM.from_config(config()).model.rotary_emb.inv_freq.numel()
    # longrope's factor lists: one per rotary frequency, which GLM's partial rotary counts over the whole head
    variants = list(_rope_variants(half).items()) + [("longrope", _rope_variants(config().head_dim // 2)["longrope"])]
    tried = []
    for name, rope in variants:
        if name in tried:
            continue
        cfg = config()
        cfg.rope_parameters = rope
        torch.manual_seed(0)
        try:  # transformers itself builds and reloads it (GLM's partial rotary breaks its longrope)
            AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(tmp_path / name))
            AutoModelForCausalLM.from_pretrained(str(tmp_path / name), local_files_only=True)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            print(arch, name, "not run by transformers:", " ".join(str(err).split())[:120])
            continue
        for seq in (40, 80):
            _same_as_transformers(tmp_path / name, seq)
        tried.append(name)
    needed = {"default", "linear", "dynamic", "yarn", "llama3", "longrope"} - ({"longrope"} if arch == "glm4_moe" else set())
    assert needed <= set(tried), tried


@pytest.mark.parametrize("act,refused", [("swish", False), ("gelu", True), ("relu", True)])
def test_expert_activation(qwen3, tmp_path, act, refused):
    """``hidden_act: swish`` is transformers' SiLU (ACT2FN maps it to torch's SiLU): it loads and
    reproduces transformers (it was refused); any other activation is refused in one line."""
    path = _copy(qwen3, tmp_path / act)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": act}))
    if refused:
        _refused(path, "config.json", "'hidden_act'", act)
    else:
        _same_as_transformers(path)


def test_a_config_transformers_cannot_build_is_one_line(qwen3, tmp_path):
    """An unknown ``rope_type`` passes transformers' config loading and fails building the model with a
    bare KeyError (a traceback before); from_pretrained fails the same way."""
    path = _copy(qwen3, tmp_path / "rope")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "nonexistent",
                                                                              "rope_theta": 1e4}}))
    _refused(path, "config.json", "cannot build", "nonexistent")


def test_fp16_is_refused_at_load(tmp_path):
    """An fp16 checkpoint loads in fp32 (exact) or bf16; asking for fp16 is refused at load in one line
    (the model loaded and every forward failed inside the SwiGLU kernel)."""
    path = save_tiny("qwen3_moe", tmp_path / "half", seed=1)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float16).save_pretrained(str(path))
    assert json.loads((path / "config.json").read_text())["dtype"] == "float16"
    _same_as_transformers(path)  # both upcast the fp16 weights exactly
    from desmoe.errors import UserError
    from desmoe.models.hf_moe import load_hf_moe

    with pytest.raises(UserError, match="dtype torch.float16: expected torch.float32 or torch.bfloat16"):
        load_hf_moe(path, dtype=torch.float16)


@pytest.mark.parametrize("damage", ["lfs_pointer", "truncated"])
def test_unreadable_weight_files_are_named(qwen3, tmp_path, damage):
    """A clone made without git-lfs (pointer files under the weights' names) or an interrupted copy:
    safetensors' bare SafetensorError named no file (a traceback); now one line naming it."""
    path = _copy(qwen3, tmp_path / damage)
    weights = path / "model.safetensors"
    if damage == "lfs_pointer":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 123456\n")
        _refused(path, str(weights), "git lfs pull")
    else:
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
        _refused(path, str(weights), "not a readable safetensors file")


@pytest.mark.parametrize("arch,dense", [("qwen3_moe", dict(mlp_only_layers=[0, 1])),
                                        ("qwen2_moe", dict(decoder_sparse_step=3)),
                                        ("deepseek_v3", dict(first_k_dense_replace=3))])
def test_a_base_without_sparse_layers_is_refused(tmp_path, arch, dense):
    """A config whose options leave every layer dense loads (it is transformers' dense model), but the
    DES-MoE recipe's base must have experts: before, DGES stopped on ``blocks[0]`` with an IndexError."""
    import types

    from hf_tiny import tiny_config
    from transformers import AutoModelForCausalLM

    from desmoe.errors import UserError
    from desmoe.recipes.des_moe.base_model import build_model

    cfg = tiny_config(arch)
    for key, value in dense.items():
        setattr(cfg, key, value)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / arch))
    _same_as_transformers(tmp_path / arch)
    run = types.SimpleNamespace(base=types.SimpleNamespace(hf=str(tmp_path / arch), bias_update_rate=0.0),
                                model=types.SimpleNamespace(ep_size=1), train=types.SimpleNamespace(seq_len=8))
    with pytest.raises(UserError) as err:
        build_model(run)
    assert "\n" not in str(err.value) and "no sparse MoE layer" in str(err.value)


@pytest.mark.parametrize("model_type,refused", [("qwen3_moe", False), ("my_moe", True)])
def test_evaluate_loads_a_known_family_that_ships_its_own_code(qwen3, tmp_path, model_type, refused):
    """A local copy of a hub DeepSeek-V2/V3 folder carries ``auto_map`` and its modeling file: ``desmoe.evaluate``
    refused it ("auto_map names code desmoe did not write") although ``base.hf`` loads it.  A known family now
    runs on desmoe's blocks as in training (the shipped code is never run); an unknown one is one line."""
    from desmoe.evaluate import load_model

    path = _copy(qwen3, tmp_path / "shipped")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "configuration_x.XConfig",
                                                "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "modeling_x.py").write_text("raise SystemExit('the shipped code ran')\n")
    if refused:
        from desmoe.errors import UserError

        with pytest.raises(UserError) as err:
            load_model(path)
        assert "\n" not in str(err.value) and "config.json" in str(err.value), err.value
        return
    cfg.pop("auto_map")  # the reference: the same folder as transformers' built-in class reads it
    ref_dir = _copy(qwen3, tmp_path / "plain")
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32, local_files_only=True).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(load_model(path).eval()(ids).logits, ref(ids).logits, terms=_terms(ref.config, SEQ))
