"""A tiny Llama GGUF (F32 tensors, a byte-level BPE vocab), written with the ``gguf`` package's own writer:
what transformers' GGUF reader takes, small enough to dequantise in a second."""
from pathlib import Path

import numpy as np

V, D, F = 32, 16, 32  # vocab, width, MLP width


def write_tiny_gguf(path: Path, seed: int, extra_tokens: int = 0, vocab_size_key: bool = True) -> Path:
    """``extra_tokens``: tokens past the embedding's rows; ``vocab_size_key``: write ``llama.vocab_size``."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(1)
    w.add_feed_forward_length(F)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if vocab_size_key:
        w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    # "<|endoftext|>" in the vocabulary, as in GPT-2-style ones: transformers' GGUF tokenizer adds it otherwise
    tokens = [chr(ord("a") + i) for i in range(25)] + ["ab"] + [f"<{i}>" for i in range(26, V - 1 + extra_tokens)]
    tokens.append("<|endoftext|>")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", rand(V, D))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(D, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(D, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", rand(D, D))
    w.add_tensor("blk.0.ffn_gate.weight", rand(F, D))
    w.add_tensor("blk.0.ffn_up.weight", rand(F, D))
    w.add_tensor("blk.0.ffn_down.weight", rand(D, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
