"""What differs between the HF MoE architectures desmoe can run, in one table.

Each entry says which decoder layers are sparse, how the HF router scores and
weights experts, what the routed experts' width is, and how the shared experts
(if any) are named and gated.  Everything else (attention, norms, dense layers,
embeddings) stays the model's own module and needs no entry.

All four store routed experts the transformers-5 way in memory
(``mlp.experts.gate_up_proj [E, 2f, d]`` with gate rows first, ``down_proj
[E, d, f]``) and the router as ``mlp.gate.weight [E, d]``; checkpoints on disk
may instead hold one tensor per expert (``legacy`` names below).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from desmoe.errors import UserError


@dataclass(frozen=True)
class MoEArch:
    model_type: str
    is_moe_layer: Callable[[Any, int], bool]
    expert_ffn: Callable[[Any], int]
    router: Callable[[Any], dict]  # LinearRouter keyword arguments (k, score_func, ...)
    shared: Optional[str] = None  # attribute of the HF block holding the shared expert(s)
    shared_gate: Optional[str] = None  # attribute of its sigmoid gate (Linear d -> 1)
    legacy: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert names on disk
    renames: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # old -> new key fragments on disk


def _softmax_topk(cfg, normalize: bool) -> dict:
    return dict(k=cfg.num_experts_per_tok, score_func="softmax", normalize_topk=normalize)


def _deepseek_router(cfg) -> dict:
    # transformers' DeepseekV2TopkRouter never renormalises (norm_topk_prob is unused) and
    # always multiplies by routed_scaling_factor.
    kw = dict(k=cfg.num_experts_per_tok, score_func="softmax", normalize_topk=False,
              scaling=float(cfg.routed_scaling_factor))
    if cfg.topk_method == "group_limited_greedy":
        kw.update(num_groups=cfg.n_group, topk_groups=cfg.topk_group)
    elif cfg.topk_method != "greedy":
        raise UserError(f"deepseek_v2 topk_method '{cfg.topk_method}' is not supported "
                        f"(supported: greedy, group_limited_greedy)")
    return kw


def _qwen2_moe_layer(cfg, i: int) -> bool:
    return i not in cfg.mlp_only_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0


ARCHITECTURES: dict[str, MoEArch] = {
    "mixtral": MoEArch(
        "mixtral", is_moe_layer=lambda cfg, i: True, expert_ffn=lambda cfg: cfg.intermediate_size,
        router=lambda cfg: _softmax_topk(cfg, normalize=True),
        legacy=("w1", "w3", "w2"), renames=((".block_sparse_moe.", ".mlp."),)),
    "qwen2_moe": MoEArch(
        "qwen2_moe", is_moe_layer=_qwen2_moe_layer, expert_ffn=lambda cfg: cfg.moe_intermediate_size,
        router=lambda cfg: _softmax_topk(cfg, normalize=cfg.norm_topk_prob),
        shared="shared_expert", shared_gate="shared_expert_gate"),
    "olmoe": MoEArch(
        "olmoe", is_moe_layer=lambda cfg, i: True, expert_ffn=lambda cfg: cfg.intermediate_size,
        router=lambda cfg: _softmax_topk(cfg, normalize=cfg.norm_topk_prob)),
    "deepseek_v2": MoEArch(
        "deepseek_v2", is_moe_layer=lambda cfg, i: i >= cfg.first_k_dense_replace,
        expert_ffn=lambda cfg: cfg.moe_intermediate_size, router=_deepseek_router, shared="shared_experts"),
}


def arch_for(config, source: str = "checkpoint") -> MoEArch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"{source}: unsupported architecture '{model_type}' "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"{source}: key 'hidden_act': expected 'silu' (SwiGLU experts), got {config.hidden_act!r}")
    return ARCHITECTURES[model_type]
