"""Expert networks and their initialisation per global expert id.

Experts are ordinary modules that map ``[N, d] -> [N, d]``.  They are held in
DeepSpeed's ``Experts`` container (which marks their parameters as expert
parameters for ZeRO and names them in checkpoints), but the dispatcher calls
each one directly on its contiguous slice of tokens.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.moe.layout import ExpertLayout

InitMode = Literal["independent", "copies"]


def _init_linear(linear: nn.Linear, gen: torch.Generator, std: float | None = None) -> None:
    """Kaiming-uniform like nn.Linear's default, but from an explicit generator."""
    with torch.no_grad():
        fan_in = linear.weight.shape[1]
        if std is None:
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.rand(linear.weight.shape, generator=gen) * 2 * bound - bound
        else:
            w = torch.randn(linear.weight.shape, generator=gen) * std
        linear.weight.copy_(w.to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.zero_()


class SwiGLUExpert(nn.Module):
    """LLaMA/Mixtral-style expert: down(silu(gate(x)) * up(x)); gate and up fused in one GEMM."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.ffn_size = ffn_size
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def reset_parameters(self, gen: torch.Generator) -> None:
        _init_linear(self.gate_up, gen)
        _init_linear(self.down, gen)


class ClampedSwiGLUExpert(nn.Module):
    """SwiGLU with biases, clamped inputs and a sharpened gate (GPT-OSS's experts):
    down((clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)), g = min(gate, limit).

    Gate rows first in ``gate_up`` (as in :class:`SwiGLUExpert`); the clamps keep the
    activation bounded, and ``up + 1`` lets an expert pass the gate through at up = 0."""

    def __init__(self, hidden_size: int, ffn_size: int, alpha: float = 1.702, limit: float = 7.0) -> None:
        super().__init__()
        self.ffn_size, self.alpha, self.limit = ffn_size, alpha, limit
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_size, bias=True)
        self.down = nn.Linear(ffn_size, hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return self.down((up + 1) * gate * torch.sigmoid(gate * self.alpha))

    def reset_parameters(self, gen: torch.Generator) -> None:
        _init_linear(self.gate_up, gen)
        _init_linear(self.down, gen)


class MLPExpert(nn.Module):
    """Two-layer GELU MLP (ViT/CLIP-style)."""

    def __init__(self, hidden_size: int, ffn_size: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.fc2 = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def reset_parameters(self, gen: torch.Generator) -> None:
        _init_linear(self.fc1, gen)
        _init_linear(self.fc2, gen)


class AdapterExpert(nn.Module):
    """Bottleneck adapter: up(relu(down(x))) * scale; starts near zero so a fresh
    adapter leaves the frozen model's function almost unchanged."""

    def __init__(self, hidden_size: int, bottleneck: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.relu(self.down(x))) * self.scale

    def reset_parameters(self, gen: torch.Generator) -> None:
        _init_linear(self.down, gen)
        _init_linear(self.up, gen, std=1e-3)


EXPERT_TYPES: dict[str, Callable[..., nn.Module]] = {
    "swiglu": SwiGLUExpert,
    "mlp": MLPExpert,
    "adapter": AdapterExpert,
}


def build_expert(kind: str, hidden_size: int, ffn_size: int) -> nn.Module:
    if kind not in EXPERT_TYPES:
        raise ValueError(f"unknown expert type '{kind}' (known: {', '.join(EXPERT_TYPES)})")
    return EXPERT_TYPES[kind](hidden_size, ffn_size)


def init_local_experts(
    local_experts: nn.ModuleList,
    layout: ExpertLayout,
    ep_rank: int,
    seed: int,
    mode: InitMode = "independent",
) -> None:
    """Initialise this rank's experts so the result does not depend on ``ep_size``.

    ``independent``: expert g is drawn from a generator seeded by (seed, g), so
    EP=1 and EP=2 build the same global experts.  ``copies``: every expert gets
    the draw of expert 0 (sparse upcycling starts from identical experts).
    """
    for local_id, expert in enumerate(local_experts):
        global_id = layout.global_id(ep_rank, local_id)
        draw = 0 if mode == "copies" else global_id
        gen = torch.Generator().manual_seed(seed * 1_000_003 + draw)
        expert.reset_parameters(gen)
