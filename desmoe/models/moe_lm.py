"""A small decoder-only MoE language model built on the desmoe MoE block.

Pre-norm transformer: attention + MoE feed-forward per layer, learned positions,
tied embeddings.  It carries no distribution logic: expert parallelism lives in
the MoE blocks and is wired up by ``setup_expert_parallel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.config import bad
from desmoe.moe import LinearRouter, MLPExpert, MoEBlock, build_expert, moe_blocks, total_aux_loss


@dataclass
class MoELMConfig:
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_seq_len: int = 256
    num_experts: int = 8
    top_k: int = 2
    ffn_size: int = 256
    expert_type: Literal["swiglu", "mlp"] = "swiglu"
    shared_ffn_size: int = 0  # 0 = no always-on shared expert
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    normalize_topk: bool = True
    capacity_factor: Optional[float] = None  # None = dropless
    ep_size: int = 1
    expert_init: Literal["independent", "copies"] = "independent"
    init_seed: int = 0

    def check(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "num_experts",
                    "ffn_size", "ep_size"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer", getattr(self, key))
        if self.hidden_size % self.num_heads:
            raise bad("num_heads", f"a divisor of hidden_size={self.hidden_size}", self.num_heads)
        if not 1 <= self.top_k <= self.num_experts:
            raise bad("top_k", f"1..num_experts={self.num_experts}", self.top_k)
        if self.num_experts % self.ep_size:
            raise bad("ep_size", f"a divisor of num_experts={self.num_experts}", self.ep_size)
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise bad("capacity_factor", "a positive number or null (dropless)", self.capacity_factor)


class Attention(nn.Module):
    def __init__(self, cfg: MoELMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoELMConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size)
        # Top-1 keeps its score as the weight (a renormalised top-1 weight is always 1, which would
        # leave the router without a task gradient); this model renormalises only for k >= 2.
        router = LinearRouter(cfg.hidden_size, cfg.num_experts, cfg.top_k, score_func=cfg.score_func,
                              normalize_topk=cfg.normalize_topk and cfg.top_k > 1)
        shared = MLPExpert(cfg.hidden_size, cfg.shared_ffn_size) if cfg.shared_ffn_size else None
        self.moe = MoEBlock(cfg.hidden_size, build_expert(cfg.expert_type, cfg.hidden_size, cfg.ffn_size), router,
                            ep_size=cfg.ep_size, capacity_factor=cfg.capacity_factor,
                            eval_capacity_factor=cfg.capacity_factor, shared=shared)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.ffn_norm(x))


class MoELM(nn.Module):
    def __init__(self, cfg: MoELMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(cfg.init_seed)  # dense weights equal on every rank before any broadcast
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def setup_expert_parallel(self) -> None:
        """Create DeepSpeed's EP groups and draw each rank's experts by global id."""
        for i, block in enumerate(moe_blocks(self)):
            if block.ep_size > 1 or torch.distributed.is_initialized():
                block.set_deepspeed_parallelism()
            block.init_experts(seed=self.cfg.init_seed * 1000 + i, mode=self.cfg.expert_init)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        for layer in self.layers:
            x = layer(x)
        return F.linear(self.norm(x), self.embed.weight)

    def loss(self, input_ids: Tensor, aux_coef: float = 0.0) -> tuple[Tensor, Tensor]:
        """Next-token cross-entropy (+ aux_coef * load balancing); returns (total, lm loss)."""
        logits = self(input_ids[:, :-1])
        lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        return lm + aux_coef * total_aux_loss(self), lm.detach()
