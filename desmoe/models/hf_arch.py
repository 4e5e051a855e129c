"""What differs between the HF MoE architectures desmoe can run, in one table.

Each entry says which decoder layers are sparse, how many routed experts there
are, what one routed expert is, how the HF router scores, selects and weights
experts (as :class:`desmoe.moe.LinearRouter` keyword arguments), how the shared
experts (if any) are named and gated, and which configuration values the core
cannot reproduce (``check`` refuses them at load in one line, so nothing ever
runs silently different from transformers).  Everything else (attention with
its sinks or MLA, norms, dense layers, embeddings) stays the model's own module
and needs no entry.

Routed experts are kept in desmoe's layout (``gate_up.weight [2f, d]`` with the
gate rows first, ``down.weight [d, f]``, optional biases); ``experts_from_hf`` /
``experts_to_hf`` convert from and to each family's layout: transformers-5's
fused ``gate_up_proj [E, 2f, d]`` / ``down_proj [E, d, f]`` (or one tensor per
expert on disk, the ``legacy`` names), or GPT-OSS's transposed, interleaved
(gate, up, gate, up, ...) tensors with biases.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from desmoe.errors import UserError
from desmoe.moe import ClampedSwiGLUExpert, SwiGLUExpert


@dataclass(frozen=True)
class MoEArch:
    model_type: str
    is_moe_layer: Callable[[Any, int], bool]
    num_experts: Callable[[Any], int]
    expert: Callable[[Any], nn.Module]  # one routed expert (the template DeepSpeed's Experts copies)
    router: Callable[[Any], dict]  # LinearRouter keyword arguments (k, score_func, ...)
    check: Callable[[Any, str], None] = lambda cfg, where: None  # refuse what the core cannot reproduce
    shared: Optional[str] = None  # attribute of the HF block holding the shared expert(s)
    shared_gate: Optional[str] = None  # attribute of its sigmoid gate (Linear d -> 1)
    router_name: str = "gate"  # attribute of the HF block holding the router
    router_bias: bool = False  # the router's Linear has a bias
    selection_bias: Optional[str] = None  # router buffer added to the scores for selection only
    gpt_oss_experts: bool = False  # GPT-OSS's transposed, interleaved expert tensors with biases
    returns_tuple: bool = False  # the HF decoder layer unpacks (hidden, router scores) from its MLP
    legacy: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert names on disk
    renames: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # old -> new key fragments on disk


def _refuse(where: str, key: str, expected: str, got) -> UserError:
    return UserError(f"{where}: key '{key}': expected {expected}, got {got!r}")


def _check_topk(cfg, where: str, num_experts: int) -> None:
    k = cfg.num_experts_per_tok
    if not isinstance(k, int) or not 1 <= k <= num_experts:
        raise _refuse(where, "num_experts_per_tok", f"an integer in 1..{num_experts} (the routed experts)", k)


def _check_groups(cfg, where: str, num_experts: int, min_group: int) -> None:
    """Group-limited top-k must pick k experts from the kept groups' experts alone."""
    n_group, topk_group = cfg.n_group, cfg.topk_group
    if not isinstance(n_group, int) or n_group < 1 or num_experts % n_group or num_experts // n_group < min_group:
        raise _refuse(where, "n_group", f"a divisor of the {num_experts} routed experts leaving >= {min_group} "
                      f"experts per group", n_group)
    if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise _refuse(where, "topk_group", f"an integer in 1..n_group={n_group}", topk_group)
    if cfg.num_experts_per_tok > topk_group * (num_experts // n_group):
        raise _refuse(where, "num_experts_per_tok", f"at most topk_group * experts per group = "
                      f"{topk_group * (num_experts // n_group)} (transformers would pick experts of dropped groups)",
                      cfg.num_experts_per_tok)


def _check_silu(cfg, where: str) -> None:
    # transformers' ACT2FN["swish"] is torch's SiLU: the same function, bit for bit
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        raise _refuse(where, "hidden_act", "'silu' (SwiGLU experts)", cfg.hidden_act)


def _softmax_topk(cfg, normalize: bool) -> dict:
    return dict(k=cfg.num_experts_per_tok, score_func="softmax", normalize_topk=bool(normalize))


# --- per family ------------------------------------------------------------------------------------

def _mixtral_check(cfg, where: str) -> None:
    _check_silu(cfg, where)
    _check_topk(cfg, where, cfg.num_local_experts)
    if cfg.router_jitter_noise:
        # transformers multiplies the experts' input too, in place, not only the router's.
        raise _refuse(where, "router_jitter_noise", "0.0 (input jitter of the experts is not reproduced)",
                      cfg.router_jitter_noise)


def _qwen_check(cfg, where: str) -> None:
    _check_silu(cfg, where)
    if cfg.num_experts:
        _check_topk(cfg, where, cfg.num_experts)
    if not isinstance(cfg.decoder_sparse_step, int) or cfg.decoder_sparse_step < 1:
        raise _refuse(where, "decoder_sparse_step", "a positive integer", cfg.decoder_sparse_step)


def _qwen_moe_layer(cfg, i: int) -> bool:
    return i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0


def _deepseek_v2_check(cfg, where: str) -> None:
    _check_silu(cfg, where)
    _check_topk(cfg, where, cfg.n_routed_experts)
    if cfg.topk_method not in ("greedy", "group_limited_greedy"):
        raise _refuse(where, "topk_method", "'greedy' or 'group_limited_greedy'", cfg.topk_method)
    if cfg.topk_method == "group_limited_greedy":
        _check_groups(cfg, where, cfg.n_routed_experts, min_group=1)


def _deepseek_v2_router(cfg) -> dict:
    # transformers' DeepseekV2TopkRouter never renormalises (norm_topk_prob is unused) and
    # always multiplies by routed_scaling_factor.
    kw = dict(k=cfg.num_experts_per_tok, score_func="softmax", normalize_topk=False,
              scaling=float(cfg.routed_scaling_factor))
    if cfg.topk_method == "group_limited_greedy":
        kw.update(num_groups=cfg.n_group, topk_groups=cfg.topk_group, group_score="max")
    return kw


def _deepseek_v3_check(cfg, where: str) -> None:
    _check_silu(cfg, where)
    _check_topk(cfg, where, cfg.n_routed_experts)
    # The group score is the sum of a group's best two biased scores: groups need two experts.
    _check_groups(cfg, where, cfg.n_routed_experts, min_group=2)


def _deepseek_v3_router(cfg) -> dict:
    # Sigmoid scores; e_score_correction_bias (a buffer) only changes which experts win;
    # groups scored by their top-2 biased scores (noaux_tc); weights = unbiased scores,
    # renormalised if norm_topk_prob, times routed_scaling_factor.  Same for GLM-4.5.
    return dict(k=cfg.num_experts_per_tok, score_func="sigmoid", normalize_topk=bool(cfg.norm_topk_prob),
                scaling=float(cfg.routed_scaling_factor), num_groups=cfg.n_group, topk_groups=cfg.topk_group,
                group_score="top2_sum", selection_bias=True)


def _gpt_oss_check(cfg, where: str) -> None:
    _check_topk(cfg, where, cfg.num_local_experts)


def _gpt_oss_router(cfg) -> dict:
    # softmax over the top-k logits = the full softmax renormalised over the top k (same experts:
    # softmax is monotone), so the core's renormalised softmax reproduces it, top-1 included.
    return dict(k=cfg.num_experts_per_tok, score_func="softmax", normalize_topk=True)


def _swiglu(width: Callable[[Any], int]) -> Callable[[Any], nn.Module]:
    return lambda cfg: SwiGLUExpert(cfg.hidden_size, width(cfg))


ARCHITECTURES: dict[str, MoEArch] = {
    "mixtral": MoEArch(
        "mixtral", is_moe_layer=lambda cfg, i: True, num_experts=lambda cfg: cfg.num_local_experts,
        expert=_swiglu(lambda cfg: cfg.intermediate_size), router=lambda cfg: _softmax_topk(cfg, normalize=True),
        check=_mixtral_check, legacy=("w1", "w3", "w2"), renames=((".block_sparse_moe.", ".mlp."),)),
    "qwen2_moe": MoEArch(
        "qwen2_moe", is_moe_layer=_qwen_moe_layer, num_experts=lambda cfg: cfg.num_experts,
        expert=_swiglu(lambda cfg: cfg.moe_intermediate_size),
        router=lambda cfg: _softmax_topk(cfg, normalize=cfg.norm_topk_prob), check=_qwen_check,
        shared="shared_expert", shared_gate="shared_expert_gate"),
    "qwen3_moe": MoEArch(
        "qwen3_moe", is_moe_layer=_qwen_moe_layer, num_experts=lambda cfg: cfg.num_experts,
        expert=_swiglu(lambda cfg: cfg.moe_intermediate_size),
        router=lambda cfg: _softmax_topk(cfg, normalize=cfg.norm_topk_prob), check=_qwen_check),
    "olmoe": MoEArch(
        "olmoe", is_moe_layer=lambda cfg, i: True, num_experts=lambda cfg: cfg.num_experts,
        expert=_swiglu(lambda cfg: cfg.intermediate_size),
        router=lambda cfg: _softmax_topk(cfg, normalize=cfg.norm_topk_prob),
        check=lambda cfg, where: (_check_silu(cfg, where), _check_topk(cfg, where, cfg.num_experts))),
    "deepseek_v2": MoEArch(
        "deepseek_v2", is_moe_layer=lambda cfg, i: i >= cfg.first_k_dense_replace,
        num_experts=lambda cfg: cfg.n_routed_experts, expert=_swiglu(lambda cfg: cfg.moe_intermediate_size),
        router=_deepseek_v2_router, check=_deepseek_v2_check, shared="shared_experts"),
    "deepseek_v3": MoEArch(
        "deepseek_v3", is_moe_layer=lambda cfg, i: i >= cfg.first_k_dense_replace,
        num_experts=lambda cfg: cfg.n_routed_experts, expert=_swiglu(lambda cfg: cfg.moe_intermediate_size),
        router=_deepseek_v3_router, check=_deepseek_v3_check, shared="shared_experts",
        selection_bias="e_score_correction_bias"),
    "glm4_moe": MoEArch(
        "glm4_moe", is_moe_layer=lambda cfg, i: i >= cfg.first_k_dense_replace,
        num_experts=lambda cfg: cfg.n_routed_experts, expert=_swiglu(lambda cfg: cfg.moe_intermediate_size),
        router=_deepseek_v3_router, check=_deepseek_v3_check, shared="shared_experts",
        selection_bias="e_score_correction_bias"),
    "gpt_oss": MoEArch(
        "gpt_oss", is_moe_layer=lambda cfg, i: True, num_experts=lambda cfg: cfg.num_local_experts,
        expert=lambda cfg: ClampedSwiGLUExpert(cfg.hidden_size, cfg.intermediate_size, alpha=cfg.swiglu_alpha,
                                               limit=cfg.swiglu_limit),
        router=_gpt_oss_router, check=_gpt_oss_check, router_name="router", router_bias=True,
        gpt_oss_experts=True, returns_tuple=True),
}


def arch_for(config, source: str = "checkpoint") -> MoEArch:
    """The entry for ``config``, after refusing (one line) any option the core cannot reproduce."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"{source}: unsupported architecture '{model_type}' "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    arch = ARCHITECTURES[model_type]
    quant = getattr(config, "quantization_config", None)
    if quant:
        # Every family: quantised weights (FP8 with weight_scale_inv, MXFP4 blocks/scales, GPTQ, AWQ,
        # bitsandbytes) are read as plain tensors here, their scales ignored: silently wrong numbers.
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise _refuse(source, "quantization_config", "none (dequantise the weights to bf16/fp32 first, e.g. "
                      "from_pretrained then save_pretrained without it)", f"quant_method {method}")
    arch.check(config, source)
    return arch


# --- expert tensors: family layout <-> desmoe layout ([n, ...] stacked over experts) ---------------

def _deinterleave(t: Tensor, dim: int) -> Tensor:
    """(g0, u0, g1, u1, ...) along ``dim`` -> (g0, g1, ..., u0, u1, ...)."""
    idx = torch.arange(t.shape[dim])
    return t.index_select(dim, torch.cat([idx[0::2], idx[1::2]]))


def _interleave(t: Tensor, dim: int) -> Tensor:
    half = t.shape[dim] // 2
    idx = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return t.index_select(dim, idx)


def experts_from_hf(arch: MoEArch, source, prefix: str, ids: range) -> dict[str, Tensor]:
    """{desmoe expert parameter name: [len(ids), ...]} for experts ``ids`` of the block at ``prefix``."""
    if not arch.gpt_oss_experts:
        gate_up, down = source.experts(prefix, ids, arch.legacy)
        return {"gate_up.weight": gate_up, "down.weight": down}
    rows = slice(ids.start, ids.stop)
    get = lambda name: source.get(f"{prefix}.experts.{name}", rows)  # noqa: E731
    return {"gate_up.weight": _deinterleave(get("gate_up_proj").transpose(1, 2), 1),
            "gate_up.bias": _deinterleave(get("gate_up_proj_bias"), 1),
            "down.weight": get("down_proj").transpose(1, 2), "down.bias": get("down_proj_bias")}


def experts_to_hf(arch: MoEArch, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``experts_from_hf`` for all experts: {key under ``<prefix>.experts.``: tensor}."""
    if not arch.gpt_oss_experts:
        return {"gate_up_proj": stacked["gate_up.weight"], "down_proj": stacked["down.weight"]}
    return {"gate_up_proj": _interleave(stacked["gate_up.weight"], 1).transpose(1, 2),
            "gate_up_proj_bias": _interleave(stacked["gate_up.bias"], 1),
            "down_proj": stacked["down.weight"].transpose(1, 2), "down_proj_bias": stacked["down.bias"]}
