"""DeepSeek-style upcycling: a dense Llama becomes fine-grained routed experts + a shared expert.

DeepSeek-V2-Lite (the DES-MoE paper's base) has many small routed experts and
always-on shared experts.  A dense SwiGLU MLP is a sum over its neurons, so it
splits exactly into disjoint neuron groups: the ``shared`` most important
neurons become the shared expert, the rest are cut into ``E`` equal routed
experts.  With every expert active and equal weights the sum is the dense MLP.

The result is written as **qwen2_moe**, the one MoE family desmoe loads whose
transformers class has exactly Llama's attention: ``qkv_bias=False`` gives
plain q/k/v projections, the rotary embedding and RMSNorm are Llama's and the
embeddings may be tied.  (Qwen3-MoE adds per-head q/k norms; DeepSeek-V2/V3
use multi-head latent attention: neither reproduces Llama.)  Its shared expert
is scaled by ``sigmoid(shared_expert_gate(x))``; a zero gate gives exactly 1/2,
so the shared expert's down projection is doubled (exact in floating point).

Routing: softmax top-k renormalised over the k chosen (``norm_topk_prob``);
each routed expert's down projection is multiplied by k, so a chosen expert
contributes its dense share when the weights are uniform (exactly so with a
zero router and k = E, E a power of two).  With k < E the dropped neurons are
the gap to the dense model; the router decides which, so it is initialised to
pick the groups that matter for each token:

* ``router="fit"`` (needs calibration tokens): run the dense model, record each
  MLP's input x and every group's output norm; the router is the ridge
  regression x -> group norms, scaled down so the k chosen weights stay
  near-uniform (top-k is scale-free, so the choice is unchanged);
* ``router="zero"``: no preference (the first k experts win every tie).

Neuron groups: with calibration, neurons that fire together are clustered
(balanced k-means on activation magnitudes, as in MoEfication) so a chosen group
holds most of a token's active neurons; without, consecutive slices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
from torch import Tensor

from desmoe.errors import UserError

RouterInit = Literal["fit", "zero"]
# Kept from the dense config; everything MLP-related is set below.
DENSE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
              "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
              "attention_dropout")
ROUTER_SPREAD = 0.1  # std of the fitted router's logits: weights stay within ~10% of 1/k


def shared_moe_config(dense_cfg, num_experts: int, top_k: int, shared_ffn: int):
    from transformers import Qwen2MoeConfig

    from desmoe.models.upcycle import check_dense

    check_dense(dense_cfg, "qwen2_moe")
    ffn = dense_cfg.intermediate_size
    if not 1 <= shared_ffn < ffn:
        raise UserError(f"upcycling: shared_ffn {shared_ffn} must be in 1..{ffn - 1} (the MLP width is {ffn})")
    if num_experts < 1 or (ffn - shared_ffn) % num_experts:
        raise UserError(f"upcycling: {num_experts} experts do not divide the {ffn - shared_ffn} routed neurons "
                        f"(MLP width {ffn} - shared_ffn {shared_ffn})")
    if not 1 <= top_k <= num_experts:
        raise UserError(f"upcycling: top_k {top_k} must be in 1..num_experts={num_experts}")
    kwargs = {k: getattr(dense_cfg, k) for k in DENSE_KEYS if hasattr(dense_cfg, k)}
    return Qwen2MoeConfig(**kwargs, intermediate_size=ffn, qkv_bias=False, use_sliding_window=False,
                          moe_intermediate_size=(ffn - shared_ffn) // num_experts,
                          shared_expert_intermediate_size=shared_ffn, num_experts=num_experts,
                          num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[])


def balanced_groups(features: Tensor, groups: int, iters: int = 10, seed: int = 0) -> Tensor:
    """Equal-size clusters of the rows of ``features`` (cosine k-means, greedy capacity-limited
    assignment); returns the row indices ordered group by group."""
    n = features.shape[0]
    size = n // groups
    f = torch.nn.functional.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centres = f[torch.randperm(n, generator=gen)[:groups]]
    for _ in range(iters):
        score = f @ centres.T  # (n, groups)
        owner_list, room = [-1] * n, [size] * groups
        for flat in score.flatten().argsort(descending=True).tolist():  # best (row, group) pairs first
            row, g = divmod(flat, groups)
            if owner_list[row] < 0 and room[g]:  # each group filled to its size
                owner_list[row], room[g] = g, room[g] - 1
        owner = torch.tensor(owner_list)
        members = torch.nn.functional.one_hot(owner, groups).to(f.dtype)  # (n, groups): one matmul, no masks
        centres = torch.nn.functional.normalize(members.T @ f, dim=1)
    return owner.argsort(stable=True)


def _layer_split(gate: Tensor, up: Tensor, down: Tensor, num_experts: int, shared_ffn: int,
                 x: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(shared neuron ids, routed neuron ids in expert order) of one MLP."""
    if x is not None:  # importance: a neuron's mean output magnitude on the calibration tokens
        act = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)).abs()
        importance = act.mean(0) * down.norm(dim=0)
    else:
        act = None
        importance = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    order = importance.argsort(descending=True)
    shared, rest = order[:shared_ffn].sort().values, order[shared_ffn:].sort().values
    if act is None or num_experts == 1:
        return shared, rest
    return shared, rest[balanced_groups(act[:, rest].T, num_experts)]


def _fit_router(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, routed: Tensor, num_experts: int) -> Tensor:
    """Ridge regression of each group's output norm on the MLP input, as router logits."""
    a = torch.nn.functional.silu(x @ gate[routed].T) * (x @ up[routed].T)  # (tokens, routed neurons)
    m = len(routed) // num_experts
    norms = torch.stack([(a[:, e * m:(e + 1) * m] @ down[:, routed[e * m:(e + 1) * m]].T).norm(dim=1)
                         for e in range(num_experts)], dim=1)
    xd, t = x.double(), (norms - norms.mean(0)).double()
    ridge = 1e-3 * xd.pow(2).sum(0).mean() * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(xd.T @ xd + ridge, xd.T @ t).T  # (experts, hidden)
    spread = (xd @ w.T).std().clamp_min(1e-12)
    return (w * (ROUTER_SPREAD / spread)).to(gate.dtype)


def shared_upcycle_state(dense_state: dict[str, Tensor], cfg, router: RouterInit = "fit",
                         calib: Optional[list[Tensor]] = None) -> dict[str, Tensor]:
    """Dense Llama weights -> qwen2_moe weights.  ``calib[i]``: MLP inputs (tokens, hidden) of layer i."""
    if router == "fit" and calib is None:
        raise UserError("upcycling: router 'fit' needs calibration text (or use router 'zero')")
    E, k, s = cfg.num_experts, cfg.num_experts_per_tok, cfg.shared_expert_intermediate_size
    state = {n: v for n, v in dense_state.items() if ".mlp." not in n}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        gate, up, down = (dense_state[f"{p}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        x = calib[i].to(gate.dtype) if calib is not None else None
        shared, routed = _layer_split(gate, up, down, E, s, x)
        state[f"{p}.shared_expert.gate_proj.weight"] = gate[shared].clone()
        state[f"{p}.shared_expert.up_proj.weight"] = up[shared].clone()
        state[f"{p}.shared_expert.down_proj.weight"] = down[:, shared] * 2  # sigmoid(0) = 1/2
        state[f"{p}.shared_expert_gate.weight"] = torch.zeros(1, gate.shape[1], dtype=gate.dtype)
        groups = routed.view(E, -1)
        state[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
        state[f"{p}.experts.down_proj"] = torch.stack([down[:, g] * k for g in groups])
        state[f"{p}.gate.weight"] = (_fit_router(x, gate, up, down, routed, E) if router == "fit"
                                     else torch.zeros(E, gate.shape[1], dtype=gate.dtype))
    return state


@torch.no_grad()
def mlp_inputs(model, ids: Tensor) -> list[Tensor]:
    """Each decoder layer's MLP input (post-norm hidden states) on ``ids``, flattened to (tokens, hidden)."""
    seen: list[Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].flatten(0, -2).float()))
             for layer in model.model.layers]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def upcycle_shared(dense: str | Path, out_dir: str | Path, num_experts: int, top_k: int, shared_ffn: int,
                   router: RouterInit = "fit", calib_ids: Optional[Tensor] = None,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write the DeepSeek-style (qwen2_moe) upcycled MoE of the dense checkpoint ``dense`` to ``out_dir``.
    ``calib_ids``: (batch, seq) token ids of general text for the neuron groups and the fitted router."""
    from transformers import AutoModelForCausalLM

    from desmoe.models.hf_io import checkpoint_config
    from desmoe.models.upcycle import save_upcycled

    if router not in ("fit", "zero"):
        raise UserError(f"upcycling: router '{router}': expected fit or zero")
    cfg = shared_moe_config(checkpoint_config(dense), num_experts, top_k, shared_ffn)
    dense_model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=dtype, local_files_only=True).eval()
    calib = mlp_inputs(dense_model, calib_ids) if calib_ids is not None else None
    state = shared_upcycle_state(dense_model.state_dict(), cfg, router, calib)
    del dense_model, calib
    return save_upcycled(cfg, state, dense, out_dir, dtype)
