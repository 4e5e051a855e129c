"""The routing options of each supported HF MoE family, enumerated from its transformers config class.

``OPTIONS[family]`` gives, for every routing-related field of the config class (see ``ROUTING``),
the values the parity test tries; ``NOT_ROUTING`` names the matching fields that change nothing in
the forward pass, with the reason.  ``test_every_routing_field_is_enumerated`` fails when a
transformers release adds a routing field that neither lists, so the grid follows the classes.

``sample(family, seed)`` is a seeded random sample of the grid, stratified so that every
``num_experts_per_tok`` from 1 to E and every value of every other option occurs at least once.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import re

E = 4  # routed experts of every tiny model (even: EP=2 holds 2 per rank)
ROUTING = re.compile(r"expert|topk|top_k|group|scal|shared|sparse|dense|mlp_only|jitter|swiglu|tie_word|router|"
                     r"moe|routed")

NOT_ROUTING = {
    "output_router_logits": "only returns the router logits (desmoe keeps them on the blocks)",
    "router_aux_loss_coef": "weight of transformers' training aux loss, not part of the forward pass",
    "moe_intermediate_size": "a width, fixed per tiny model (expert weights are compared tensor by tensor)",
    "num_experts": "fixed at E (num_experts_per_tok covers 1..E)",
    "num_local_experts": "fixed at E (num_experts_per_tok covers 1..E)",
    "n_routed_experts": "fixed at E (num_experts_per_tok covers 1..E)",
}

K = list(range(1, E + 1))
TIE = [False, True]

OPTIONS: dict[str, dict[str, list]] = {
    "mixtral": dict(num_experts_per_tok=K, router_jitter_noise=[0.0], tie_word_embeddings=TIE),
    "qwen2_moe": dict(num_experts_per_tok=K, norm_topk_prob=[False, True], decoder_sparse_step=[1, 2],
                      mlp_only_layers=[[], [0]], shared_expert_intermediate_size=[24, 0], tie_word_embeddings=TIE),
    "qwen3_moe": dict(num_experts_per_tok=K, norm_topk_prob=[False, True], decoder_sparse_step=[1, 2],
                      mlp_only_layers=[[], [0]], tie_word_embeddings=TIE),
    "olmoe": dict(num_experts_per_tok=K, norm_topk_prob=[False, True], tie_word_embeddings=TIE),
    "deepseek_v2": dict(num_experts_per_tok=K, topk_method=["greedy", "group_limited_greedy"],
                        n_group=[1, 2, 4], topk_group=[1, 2], routed_scaling_factor=[1.0, 2.5],
                        n_shared_experts=[0, 2], first_k_dense_replace=[0, 1], norm_topk_prob=[False, True],
                        tie_word_embeddings=TIE),
    "deepseek_v3": dict(num_experts_per_tok=K, n_group=[1, 2], topk_group=[1, 2], norm_topk_prob=[True, False],
                        routed_scaling_factor=[1.0, 2.5], n_shared_experts=[0, 1], first_k_dense_replace=[0, 1],
                        tie_word_embeddings=TIE),
    "glm4_moe": dict(num_experts_per_tok=K, n_group=[1, 2], topk_group=[1, 2], norm_topk_prob=[True, False],
                     routed_scaling_factor=[1.0, 2.5], n_shared_experts=[0, 1], first_k_dense_replace=[0, 1],
                     tie_word_embeddings=TIE),
    "gpt_oss": dict(num_experts_per_tok=K, swiglu_alpha=[1.702, 1.0], swiglu_limit=[7.0, 0.5],
                    tie_word_embeddings=TIE),
}

# Values the core cannot reproduce (or transformers itself cannot run): refused at load in one line
# naming the key.  Grid combinations can be refused too (e.g. top-k larger than the kept groups).
_V3_REFUSED = [dict(n_group=4, topk_group=2),  # one expert per group: no top-2 group score
               dict(n_group=3), dict(n_group=1, topk_group=2), dict(num_experts_per_tok=E + 1)]
REFUSED: dict[str, list[dict]] = {
    "mixtral": [dict(router_jitter_noise=0.1), dict(num_experts_per_tok=0)],
    "qwen2_moe": [dict(num_experts_per_tok=E + 1)],
    "qwen3_moe": [dict(num_experts_per_tok=E + 1)],
    "olmoe": [dict(num_experts_per_tok=E + 1)],
    "deepseek_v2": [dict(topk_method="noaux_tc"), dict(topk_method="group_limited_greedy", n_group=3),
                    dict(topk_method="group_limited_greedy", n_group=2, topk_group=1, num_experts_per_tok=3)],
    "deepseek_v3": _V3_REFUSED,
    "glm4_moe": _V3_REFUSED,
    "gpt_oss": [dict(num_experts_per_tok=E + 1)],
}

FAMILIES = tuple(OPTIONS)
CONFIG_CLASS = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
                "olmoe": "OlmoeConfig", "deepseek_v2": "DeepseekV2Config", "deepseek_v3": "DeepseekV3Config",
                "glm4_moe": "Glm4MoeConfig", "gpt_oss": "GptOssConfig"}

_COMMON = dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=None, hidden_size=32, num_attention_heads=4,
               num_key_value_heads=2, num_hidden_layers=3,
               max_position_embeddings=64, initializer_range=0.3)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
BASE: dict[str, dict] = {
    "mixtral": dict(intermediate_size=16, num_local_experts=E),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=E),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=E, head_dim=8),
    "olmoe": dict(intermediate_size=16, num_experts=E),
    "deepseek_v2": dict(_MLA, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=E, q_lora_rank=None),
    "deepseek_v3": dict(_MLA, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=E, q_lora_rank=16),
    "glm4_moe": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=E, head_dim=8),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=E, head_dim=8, sliding_window=4),
}


def config_class(family: str):
    import transformers

    return getattr(transformers, CONFIG_CLASS[family])


def routing_fields(family: str) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class(family)) if ROUTING.search(f.name)]


def make_config(family: str, options: dict):
    return config_class(family)(**{**_COMMON, **BASE[family], **options})


# Group-limited routing that actually limits (one of two groups kept, top-2): always in the sample.
MUST: dict[str, list[dict]] = {
    "deepseek_v2": [dict(topk_method="group_limited_greedy", n_group=2, topk_group=1, num_experts_per_tok=2)],
    "deepseek_v3": [dict(n_group=2, topk_group=1, num_experts_per_tok=2)],
    "glm4_moe": [dict(n_group=2, topk_group=1, num_experts_per_tok=2)],
}


def runs_in_transformers(family: str, o: dict) -> bool:
    """Grid points transformers' own routers compute as intended (written from transformers' code,
    not from desmoe's checks): groups divide the experts, at most n_group groups are kept, and the
    kept groups hold at least k experts (DeepSeek-V3/GLM also need two experts per group)."""
    limited = family in ("deepseek_v3", "glm4_moe") or o.get("topk_method") == "group_limited_greedy"
    if not limited:
        return True
    n, t, k = o["n_group"], o["topk_group"], o["num_experts_per_tok"]
    min_group = 2 if family in ("deepseek_v3", "glm4_moe") else 1
    return E % n == 0 and E // n >= min_group and t <= n and k <= t * (E // n)


def sample(family: str, seed: int, per_k: int = 2) -> list[dict]:
    """``per_k`` random option sets per num_experts_per_tok (among those transformers runs), plus one
    for each value not yet drawn, the MUST points and the REFUSED ones."""
    rng = random.Random(f"{family}-{seed}")
    grid = OPTIONS[family]
    others = [name for name in grid if name != "num_experts_per_tok"]
    combos = list(itertools.product(*(range(len(grid[n])) for n in others)))
    rng.shuffle(combos)
    picked = []
    for k in grid["num_experts_per_tok"]:
        points = ({"num_experts_per_tok": k, **{n: grid[n][i] for n, i in zip(others, c)}} for c in combos)
        picked += list(itertools.islice((p for p in points if runs_in_transformers(family, p)), per_k))
    for name in others:
        for value in grid[name]:
            if not any(p[name] == value for p in picked):
                grid_points = ({"num_experts_per_tok": k, **{n: grid[n][i] for n, i in zip(others, c)}}
                               for c in combos for k in grid["num_experts_per_tok"])
                extra = next(q for q in itertools.chain((dict(p, **{name: value}) for p in picked), grid_points)
                             if q[name] == value and runs_in_transformers(family, q))
                picked.append(extra)
    picked += [dict(picked[0], **must) for must in MUST.get(family, [])]
    base = picked[0]
    return picked + [dict(base, **bad) for bad in REFUSED[family]]
