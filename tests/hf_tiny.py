"""Tiny random HF checkpoints of each supported MoE architecture, built offline.

Router weights are drawn wide (initializer_range) so tokens spread over the
experts; the group-limited and scaled DeepSeek routing, Qwen2-MoE's gated
shared expert and DeepSeek's first dense layer are all switched on, as are
DeepSeek-V3/GLM-4.5's noaux_tc routing with a non-zero selection bias and
GPT-OSS's biased, clamped experts (a limit low enough to clamp).
"""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.3, hidden_act="silu")


def tiny_config(arch: str):
    from transformers import (DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, GptOssConfig, MixtralConfig,
                              OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig)

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
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                              num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=[], head_dim=8, tie_word_embeddings=False)
    if arch in ("deepseek_v3", "glm4_moe"):
        # noaux_tc: sigmoid scores, 4 groups of 2 scored by their top-2 biased scores, 2 kept.
        groups = dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                      n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5, first_k_dense_replace=1)
        if arch == "glm4_moe":
            return Glm4MoeConfig(**COMMON, **groups, head_dim=8, use_qk_norm=True)
        common = dict(COMMON, num_key_value_heads=4)
        return DeepseekV3Config(**common, **groups, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
                                qk_rope_head_dim=4, v_head_dim=8)
    if arch == "gpt_oss":
        return GptOssConfig(**COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                            num_experts_per_tok=2, head_dim=8, sliding_window=4, swiglu_limit=1.0)
    raise ValueError(arch)


# every architecture desmoe.models.hf_arch lists
ARCHS = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v2", "qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss")


def save_tiny(arch: str, out: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():  # what transformers initialises to zero, made non-zero so it is checked
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("e_score_correction_bias", "experts.gate_up_proj_bias", "experts.down_proj_bias")):
                t.copy_(torch.randn_like(t) * 0.2)
    model.save_pretrained(str(out))
    return out
