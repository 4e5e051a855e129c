"""Tiny random HF checkpoints of each supported MoE architecture, built offline.

Router weights are drawn wide (initializer_range) so tokens spread over the
experts; the group-limited and scaled DeepSeek routing, Qwen2-MoE's gated
shared expert and DeepSeek's first dense layer are all switched on.
"""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.3, hidden_act="silu")


def tiny_config(arch: str):
    from transformers import DeepseekV2Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    if arch == "mixtral":
        return MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=4,
                             num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                              shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=3,
                              norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                              tie_word_embeddings=True)
    if arch == "olmoe":
        return OlmoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=16, num_experts=8,
                           num_experts_per_tok=2, norm_topk_prob=True)
    if arch == "deepseek_v2":
        common = dict(COMMON, num_key_value_heads=4)  # MLA: one latent per head
        return DeepseekV2Config(**common, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                                n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                                topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                routed_scaling_factor=1.5, first_k_dense_replace=1, kv_lora_rank=16,
                                q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    raise ValueError(arch)


ARCHS = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v2")  # every architecture desmoe.models.hf_arch lists


def save_tiny(arch: str, out: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    model.save_pretrained(str(out))
    return out
