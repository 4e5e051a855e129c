"""A fresh HF MoE checkpoint from a small dataclass (the embedded CPU base).

The base is an ordinary transformers model of one of the supported
architectures, randomly initialised by transformers' own ``_init_weights`` and
written with ``save_pretrained``; every rank then loads it with ``load_hf_moe``
(its own experts only), exactly like a user's checkpoint.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from desmoe.checkpoint import replace_dir_atomic
from desmoe.config import bad


@dataclass
class MoEModelSpec:
    arch: Literal["deepseek_v2", "qwen2_moe", "mixtral", "olmoe"] = "deepseek_v2"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_ffn: int = 256  # width of one routed expert
    shared_ffn: int = 256  # deepseek_v2: shared experts of expert_ffn each (rounded); qwen2_moe: width of the shared MLP
    dense_ffn: int = 768  # first dense layers (deepseek_v2)
    first_dense_layers: int = 1
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    ep_size: int = 1
    seed: int = 0

    def check(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "num_experts", "top_k", "expert_ffn",
                    "max_seq_len", "ep_size"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer", getattr(self, key))
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise bad("num_heads", f"a divisor of hidden_size={self.hidden_size} and multiple of num_kv_heads",
                      self.num_heads)
        if self.top_k > self.num_experts:
            raise bad("top_k", f"at most num_experts={self.num_experts}", self.top_k)
        if self.num_experts % self.ep_size:
            raise bad("ep_size", f"a divisor of num_experts={self.num_experts}", self.ep_size)
        if self.arch == "deepseek_v2" and self.shared_ffn % self.expert_ffn:
            raise bad("shared_ffn", f"a multiple of expert_ffn={self.expert_ffn} (deepseek_v2)", self.shared_ffn)
        if self.arch in ("mixtral", "olmoe"):  # neither has dense layers or a shared expert: a setting would be lost
            default = MoEModelSpec()
            for key in ("shared_ffn", "dense_ffn", "first_dense_layers"):
                if getattr(self, key) != getattr(default, key):
                    raise bad(key, f"unset with arch={self.arch} (it has no dense layers or shared expert)",
                              getattr(self, key))


def hf_config(spec: MoEModelSpec, vocab_size: int, bos_id=None, eos_id=None, pad_id=None):
    from transformers import DeepseekV2Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                  max_position_embeddings=spec.max_seq_len, initializer_range=spec.init_std,
                  tie_word_embeddings=spec.tie_embeddings, bos_token_id=bos_id, eos_token_id=eos_id,
                  pad_token_id=pad_id, rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta})
    if spec.arch == "deepseek_v2":
        head = spec.hidden_size // spec.num_heads
        common["num_key_value_heads"] = spec.num_heads  # MLA: keys/values come from one latent per head
        return DeepseekV2Config(**common, intermediate_size=spec.dense_ffn, moe_intermediate_size=spec.expert_ffn,
                                n_routed_experts=spec.num_experts, n_shared_experts=spec.shared_ffn // spec.expert_ffn,
                                num_experts_per_tok=spec.top_k, first_k_dense_replace=spec.first_dense_layers,
                                topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                                kv_lora_rank=spec.hidden_size // 2, q_lora_rank=None, qk_nope_head_dim=head // 2,
                                qk_rope_head_dim=head // 2, v_head_dim=head)
    if spec.arch == "qwen2_moe":
        return Qwen2MoeConfig(**common, intermediate_size=spec.dense_ffn, moe_intermediate_size=spec.expert_ffn,
                              shared_expert_intermediate_size=spec.shared_ffn, num_experts=spec.num_experts,
                              num_experts_per_tok=spec.top_k, norm_topk_prob=False, decoder_sparse_step=1,
                              mlp_only_layers=list(range(spec.first_dense_layers)))
    if spec.arch == "mixtral":
        return MixtralConfig(**common, intermediate_size=spec.expert_ffn, num_local_experts=spec.num_experts,
                             num_experts_per_tok=spec.top_k)
    return OlmoeConfig(**common, intermediate_size=spec.expert_ffn, num_experts=spec.num_experts,
                       num_experts_per_tok=spec.top_k, norm_topk_prob=False)


def spec_of(config) -> dict:
    """The :class:`MoEModelSpec` fields an HF config determines, inverting :func:`hf_config` for its four
    architectures; of another family only the fields with one meaning everywhere.  A field missing here
    (e.g. ``shared_ffn`` of a Mixtral) has no counterpart in that checkpoint."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    rope = get("rope_parameters") or {}
    out = {"arch": config.model_type, "hidden_size": get("hidden_size"), "num_layers": get("num_hidden_layers"),
           "num_heads": get("num_attention_heads"), "num_kv_heads": get("num_key_value_heads"),
           "top_k": get("num_experts_per_tok"), "max_seq_len": get("max_position_embeddings"),
           "rope_theta": rope.get("rope_theta", get("rope_theta")), "init_std": get("initializer_range"),
           "tie_embeddings": get("tie_word_embeddings"),
           "num_experts": next((get(k) for k in ("n_routed_experts", "num_experts", "num_local_experts")
                                if get(k) is not None), None)}
    if config.model_type == "deepseek_v2":
        out.update(expert_ffn=get("moe_intermediate_size"), dense_ffn=get("intermediate_size"),
                   shared_ffn=(get("n_shared_experts") or 0) * get("moe_intermediate_size"),
                   first_dense_layers=get("first_k_dense_replace"))
    elif config.model_type == "qwen2_moe":
        dense = list(get("mlp_only_layers") or [])
        out.update(expert_ffn=get("moe_intermediate_size"), dense_ffn=get("intermediate_size"),
                   shared_ffn=get("shared_expert_intermediate_size"))
        if dense == list(range(len(dense))) and get("decoder_sparse_step", 1) == 1:  # the first layers dense
            out["first_dense_layers"] = len(dense)
    elif config.model_type in ("mixtral", "olmoe"):
        out["expert_ffn"] = get("intermediate_size")
    return {k: v for k, v in out.items() if v is not None}


def write_initial_checkpoint(config, out_dir: str | Path, seed: int) -> Path:
    """Randomly initialised model for ``config`` at ``out_dir`` (atomic)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    return replace_dir_atomic(staging, out_dir, seal=True)
