"""Adaptive Lightweight Router (DES-MoE Sec. 3.1).

R_adapt(h) = W2 GELU(W1 h + b1) + b2 (Eq. 1) routes the tokens; the pretrained
linear router R_orig stays frozen next to it (requires_grad=False, never updated)
and is the teacher of the distillation loss

    L_KD = KL( softmax(R_orig(h)/tau) || softmax(R_adapt(h)/tau) )      (Eq. 2)

mixed for the router only: grad(theta_router) = lambda * grad L_KD +
(1 - lambda) * grad L_task, lambda(alpha) = max(0, 1 - alpha) (Eq. 4), while
every other parameter receives grad L_task only (Eq. 10).  One forward of the
MLP serves both losses: :class:`_RouterGradMix` returns the logits twice, once
for routing (task path) and once for L_KD, and in backward sends the router
weights (1 - lambda) * task + KD gradient and the hidden state the task
gradient alone (so distillation never moves the backbone).  The trainer adds
lambda * L_KD to the loss.

The paper's initialisation ("copy the pretrained router into W2") cannot be
done literally (W2 is 4d x E, the router d x E); ``ALRConfig.init`` picks a
reading (see config.py and docs/desmoe.md).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.recipes.des_moe.config import ALRConfig
from desmoe.moe import LinearRouter, Router, moe_blocks


def lambda_at(alpha: float, end: float = 1.0) -> float:
    """Eq. 4's weight of L_KD at training progress alpha = t / T."""
    return max(0.0, 1.0 - alpha / end)


def _gelu_grad(a: Tensor) -> Tensor:  # d/da [a * Phi(a)] for the exact (erf) GELU
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + a * pdf


class _RouterGradMix(torch.autograd.Function):
    """z = W2 GELU(W1 x + b1) + b2, returned as (z_task, z_kd).

    Backward: weights get (1 - lam) * dL/dz_task + dL/dz_kd; x gets dL/dz_task only."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, lam: float):  # type: ignore[override]
        a = F.linear(x, w1, b1)
        g = F.gelu(a)
        z = F.linear(g, w2, b2)
        ctx.save_for_backward(x, w1, w2, a, g)
        ctx.lam = lam
        return z, z.clone()

    @staticmethod
    def backward(ctx, g_task, g_kd):  # type: ignore[override]
        x, w1, w2, a, g = ctx.saved_tensors
        gelu_grad = _gelu_grad(a)
        g_param = (1.0 - ctx.lam) * g_task + g_kd
        dx = dw1 = db1 = dw2 = db2 = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4] or ctx.needs_input_grad[1]:
            dw2, db2 = g_param.t() @ g, g_param.sum(0)
            da = (g_param @ w2) * gelu_grad
            dw1, db1 = da.t() @ x, da.sum(0)
        if ctx.needs_input_grad[0]:
            dx = ((g_task @ w2) * gelu_grad) @ w1
        return dx, dw1, db1, dw2, db2, None


class AdaptiveRouter(Router):
    """MLP router with a frozen copy of the pretrained linear router as its teacher."""

    def __init__(self, hidden_size: int, num_experts: int, k: int, teacher_weight: Tensor,
                 teacher_bias: Optional[Tensor] = None, cfg: Optional[ALRConfig] = None, seed: int = 0,
                 **router_kwargs) -> None:
        super().__init__(num_experts, k, **router_kwargs)
        cfg = cfg or ALRConfig()
        self.init_reading, self.init_seed = cfg.init, seed
        hidden = cfg.hidden_mult * hidden_size
        if cfg.init in ("mirror", "gelu_copy") and hidden < (2 if cfg.init == "mirror" else 1) * hidden_size:
            raise ValueError(f"ALR init '{cfg.init}' needs hidden_mult >= {2 if cfg.init == 'mirror' else 1}")
        # The teacher keeps the pretrained router's name (router.proj.*) so base checkpoints and
        # HF weights load unchanged; requires_grad=False keeps it out of ZeRO's flat buffers.
        self.proj = nn.Linear(hidden_size, num_experts, bias=teacher_bias is not None)
        with torch.no_grad():
            self.proj.weight.copy_(teacher_weight)
            if teacher_bias is not None:
                self.proj.bias.copy_(teacher_bias)
        self.proj.requires_grad_(False)
        self.mlp_in = nn.Linear(hidden_size, hidden)
        self.mlp_out = nn.Linear(hidden, num_experts)
        self.lam = 1.0  # lambda(alpha), set by the trainer every step
        self.kd_student: Optional[Tensor] = None  # [S, E] logits carrying the L_KD gradient path
        self.kd_teacher: Optional[Tensor] = None  # [S, E] teacher logits (no gradient)
        self._init_weights(cfg.init, seed)

    @classmethod
    def from_linear(cls, router: LinearRouter, cfg: ALRConfig, seed: int = 0) -> "AdaptiveRouter":
        proj = router.proj
        alr = cls(proj.in_features, router.num_experts, router.k, proj.weight, proj.bias, cfg, seed,
                  score_func=router.score_func, normalize_topk=router.normalize_topk, scaling=router.scaling,
                  noise=router.noise, noise_eps=router.noise_eps, num_groups=router.num_groups,
                  topk_groups=router.topk_groups, group_score=router.group_score,
                  selection_bias=router.selection_bias is not None, bias_update_rate=router.bias_update_rate)
        if router.selection_bias is not None:  # the pretrained router's selection rule, bias included
            with torch.no_grad():
                alr.selection_bias.copy_(router.selection_bias)
        alr.allowed_experts = router.allowed_experts
        return alr.to(device=proj.weight.device, dtype=proj.weight.dtype)

    def reinit_from_teacher(self) -> None:
        """Redo the step-0 initialisation after new pretrained router weights were loaded into ``proj``."""
        self._init_weights(self.init_reading, self.init_seed)

    @torch.no_grad()
    def _init_weights(self, reading: str, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        w1 = torch.empty_like(self.mlp_in.weight, device="cpu")
        nn.init.kaiming_uniform_(w1, a=math.sqrt(5), generator=gen)  # nn.Linear's default, seeded
        self.mlp_in.bias.zero_()
        self.mlp_out.weight.zero_()
        self.mlp_out.bias.zero_()
        d = self.mlp_in.in_features
        wt = self.proj.weight.float().cpu()
        if reading == "mirror":  # W_orig GELU(h) - W_orig GELU(-h) = W_orig h exactly
            w1[:d], w1[d:2 * d] = torch.eye(d), -torch.eye(d)
            self.mlp_out.weight[:, :d] = wt
            self.mlp_out.weight[:, d:2 * d] = -wt
        elif reading == "gelu_copy":  # W_orig GELU(h): the literal copy, approximate
            w1[:d] = torch.eye(d)
            self.mlp_out.weight[:, :d] = wt
        if reading != "residual" and self.proj.bias is not None:
            self.mlp_out.bias.copy_(self.proj.bias)
        self.mlp_in.weight.copy_(w1)

    def compute_logits(self, x: Tensor) -> Tensor:
        x = self.jitter(x.float())
        teacher = F.linear(x, self.proj.weight.float(), None if self.proj.bias is None else self.proj.bias.float())
        z_task, z_kd = _RouterGradMix.apply(x, self.mlp_in.weight.float(), self.mlp_in.bias.float(),
                                            self.mlp_out.weight.float(), self.mlp_out.bias.float(), float(self.lam))
        self.kd_teacher = teacher.detach()
        if self.init_reading == "residual":
            self.kd_student = self.kd_teacher + z_kd
            return teacher + z_task
        self.kd_student = z_kd
        return z_task


def kd_loss(teacher_logits: Tensor, student_logits: Tensor, tau: float, tau_squared: bool = False) -> Tensor:
    """KL(softmax(t/tau) || softmax(s/tau)), summed over experts, mean over tokens."""
    loss = F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                    reduction="batchmean", log_target=True)
    return loss * tau * tau if tau_squared else loss


def alr_routers(model: nn.Module) -> list[AdaptiveRouter]:
    return [b.router for b in moe_blocks(model) if isinstance(b.router, AdaptiveRouter)]


def model_kd_loss(model: nn.Module, cfg: ALRConfig) -> Tensor:
    """Mean over MoE layers of the last forward's L_KD."""
    losses = [kd_loss(r.kd_teacher, r.kd_student, cfg.tau, cfg.tau_squared) for r in alr_routers(model)]
    return torch.stack(losses).mean() if losses else torch.zeros(())


def set_lambda(model: nn.Module, lam: float) -> None:
    for r in alr_routers(model):
        r.lam = lam


def install_alr(model: nn.Module, cfg: ALRConfig, seed: int = 0) -> int:
    """Replace every MoE block's linear router by an ALR (before the engine is built).
    Returns the number of routers replaced."""
    n = 0
    for i, block in enumerate(moe_blocks(model)):
        if isinstance(block.router, LinearRouter):
            block.router = AdaptiveRouter.from_linear(block.router, cfg, seed=seed * 1000 + i)
            n += 1
    return n


def is_router_param(name: str) -> bool:
    """Parameter names of the trainable router (the ALR's MLP, or a plain linear router)."""
    return ".router." in name
