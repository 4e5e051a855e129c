"""Sparse upcycling: a dense Llama/Mistral HF model becomes a Mixtral-layout MoE.

Mixtral is exactly Llama/Mistral with each MLP replaced by a top-k MoE of
SwiGLU experts (same attention, norms, rotary embedding, embeddings), so the
result is an ordinary HF checkpoint that ``load_hf_moe`` puts on desmoe's EP
blocks and that ``export_hf`` writes back.  Two ways to make the experts:

* ``copy`` (Komatsuzaki et al., sparse upcycling): every expert is a copy of the
  layer's MLP.  Mixtral renormalises the top-k weights to sum to 1, so with
  identical experts the layer equals the dense MLP for *any* router; the router
  gets a small random init so tokens spread over experts from the first step.
* ``segment`` (fine-grained split): the MLP's intermediate dimension is cut into
  E consecutive slices, one per expert, and each expert's down projection is
  scaled by E.  With a zero router (uniform weights 1/E) and all E experts
  active the sum of the slices is the dense MLP exactly; the router starts at
  zero and learns (the experts differ, so it gets a gradient).

Continued pretraining with ``top_k < E`` then turns the router into a real one.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from desmoe.checkpoint import replace_dir_atomic
from desmoe.errors import UserError
from desmoe.models.hf_io import checkpoint_config, refuse_untied_head
from desmoe.models.hf_moe import restore_buffers

UpcycleMode = Literal["copy", "segment"]
DENSE_TYPES = ("llama", "mistral")
SHARED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
               "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
               "attention_dropout")


def check_dense(dense_cfg, target: str) -> None:
    """A dense model the MoE layout ``target`` reproduces exactly: Llama/Mistral, no biases, no window."""
    if dense_cfg.model_type not in DENSE_TYPES:
        raise UserError(f"cannot upcycle architecture '{dense_cfg.model_type}' (supported dense models: "
                        f"{', '.join(DENSE_TYPES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(dense_cfg, flag, False):
            raise UserError(f"cannot upcycle a model with {flag}=true ({target} layers have no biases)")
    if getattr(dense_cfg, "sliding_window", None):
        raise UserError("cannot upcycle a model with a sliding window")
    if getattr(dense_cfg, "hidden_act", "silu") not in ("silu", "swish"):  # else written, then refused at load
        raise UserError(f"cannot upcycle a model with hidden_act='{dense_cfg.hidden_act}' (desmoe's experts are "
                        f"SwiGLU: expected 'silu')")


def moe_config(dense_cfg, num_experts: int, top_k: int, mode: UpcycleMode):
    from transformers import MixtralConfig

    check_dense(dense_cfg, "Mixtral")
    if not 1 <= top_k <= num_experts:
        raise UserError(f"upcycling: top_k {top_k} must be in 1..num_experts={num_experts}")
    ffn = dense_cfg.intermediate_size
    if mode == "segment" and ffn % num_experts:
        raise UserError(f"upcycling: {num_experts} experts do not divide the MLP width {ffn} (segment mode)")
    kwargs = {k: getattr(dense_cfg, k) for k in SHARED_KEYS if hasattr(dense_cfg, k)}
    return MixtralConfig(**kwargs, intermediate_size=ffn if mode == "copy" else ffn // num_experts,
                         num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None)


def upcycle_state(dense_state: dict[str, Tensor], num_layers: int, num_experts: int, mode: UpcycleMode,
                  router_std: float = 0.02, seed: int = 0) -> dict[str, Tensor]:
    """Dense Llama/Mistral weights -> Mixtral weights (transformers-5 fused expert names)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    for i in range(num_layers):
        p = f"model.layers.{i}.mlp"
        gate, up, down = (dense_state[f"{p}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        if mode == "copy":
            gate_up = torch.cat([gate, up]).expand(num_experts, -1, -1).clone()
            downs = down.expand(num_experts, -1, -1).clone()
            router = torch.randn(num_experts, gate.shape[1], generator=gen) * router_std
        else:
            g, u, d = gate.chunk(num_experts), up.chunk(num_experts), down.chunk(num_experts, dim=1)
            gate_up = torch.stack([torch.cat([g[e], u[e]]) for e in range(num_experts)])
            downs = torch.stack([d[e] * num_experts for e in range(num_experts)])
            router = torch.zeros(num_experts, gate.shape[1])
        state[f"{p}.gate.weight"] = router.to(gate.dtype)
        state[f"{p}.experts.gate_up_proj"] = gate_up
        state[f"{p}.experts.down_proj"] = downs
    return state


def upcycle(dense: str | Path, out_dir: str | Path, num_experts: int, top_k: int, mode: UpcycleMode = "copy",
            router_std: float = 0.02, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the upcycled MoE of the dense HF checkpoint ``dense`` to ``out_dir`` (HF layout)."""
    from transformers import AutoModelForCausalLM

    if mode not in ("copy", "segment"):
        raise UserError(f"upcycling mode '{mode}': expected copy or segment")
    dense_cfg = checkpoint_config(dense)
    cfg = moe_config(dense_cfg, num_experts, top_k, mode)
    dense_model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=dtype, local_files_only=True)
    state = upcycle_state(dense_model.state_dict(), cfg.num_hidden_layers, num_experts, mode, router_std, seed)
    del dense_model
    return save_upcycled(cfg, state, dense, out_dir, dtype)


# what a dense folder carries besides weights that the upcycled model keeps unchanged
KEEP_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja")


def save_upcycled(cfg, state: dict, dense: str | Path, out_dir: str | Path, dtype: torch.dtype) -> Path:
    """Materialise ``state`` as the HF model of ``cfg`` and write it, with the dense folder's tokenizer
    files, atomically (sealed) at ``out_dir``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        moe = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if cfg.tie_word_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None:  # the dense model's own head, untied by transformers: the MoE must not tie it away
            refuse_untied_head(head, state["model.embed_tokens.weight"], Path(dense) / "config.json")
    moe.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    restore_buffers(moe)
    if cfg.tie_word_embeddings:
        moe.lm_head.weight = moe.model.embed_tokens.weight
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    moe.save_pretrained(str(staging))
    for name in KEEP_FILES:
        if (Path(dense) / name).is_file():
            shutil.copy2(Path(dense) / name, staging / name)
    return replace_dir_atomic(staging, out_dir, seal=True)
