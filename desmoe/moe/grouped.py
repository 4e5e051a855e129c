"""Grouped SwiGLU experts: one autograd node for all local experts.

Running each expert as a module costs, per step, a concat of the outputs, a
concat of the input gradients (split's backward), a concat inside every expert
(chunk's backward) and about a dozen elementwise passes for the activation and
its gradient.  Here each expert writes its output and input gradient straight
into preallocated row blocks, and the activation -- optionally scaled by each
row's route weight, which then needs no pass of its own -- runs as one fused
pass forward and one backward (``desmoe.kernels`` on CPU, torch ops elsewhere).
Same math as ``SwiGLUExpert`` followed by the weighting.

An optional boolean row mask ``keep`` restricts the *weight* gradients to the
kept rows, while the input and route-weight gradients still come from every row
(a caller's per-route "does this route teach the expert" decision, e.g. gradient
isolation between data sources).  Without it the code path is unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from desmoe.kernels import swiglu_cpu


def _act_fwd(h: Tensor, w: Optional[Tensor]) -> Tensor:
    kernel = swiglu_cpu() if h.device.type == "cpu" else None
    if kernel is not None:
        return kernel.fwd(h, w)
    f = h.shape[1] // 2
    act = F.silu(h[:, :f]) * h[:, f:]
    return act * w.unsqueeze(1) if w is not None else act


def _act_bwd(h: Tensor, w: Optional[Tensor], d_act: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Returns (d_h, d_w)."""
    kernel = swiglu_cpu() if h.device.type == "cpu" else None
    if kernel is not None:
        return kernel.bwd(h, w, d_act)
    f = h.shape[1] // 2
    gate, up = h[:, :f].float(), h[:, f:].float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    act = silu * up
    d = d_act.float()
    d_w = (d * act).sum(1) if w is not None else None
    dw = d * w.float().unsqueeze(1) if w is not None else d
    d_h = torch.cat([dw * up * sig * (1 + gate * (1 - sig)), dw * silu], dim=1).to(h.dtype)
    return d_h, d_w


class GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, route_w: Optional[Tensor], keep: Optional[Tensor],  # type: ignore[override]
                counts: list[int], *weights: Tensor) -> Tensor:
        out = x.new_empty(x.shape)
        saved = []  # per expert: pre-activation h and the (weighted) activation
        start = 0
        for e, n in enumerate(counts):
            w_gate_up, w_down = weights[2 * e], weights[2 * e + 1]
            h = torch.mm(x[start:start + n], w_gate_up.t())  # [n, 2f]: gate | up
            act = _act_fwd(h, route_w[start:start + n] if route_w is not None else None)
            torch.mm(act, w_down.t(), out=out[start:start + n])
            saved.extend((h, act))
            start += n
        ctx.counts = counts
        ctx.has_w = route_w is not None
        ctx.keep = keep  # bool, not differentiable
        ctx.save_for_backward(x, route_w if route_w is not None else x.new_empty(0), *weights, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        counts = ctx.counts
        x, route_w, *rest = ctx.saved_tensors
        weights, saved = rest[:2 * len(counts)], rest[2 * len(counts):]
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        grad_route = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if ctx.has_w else None
        grad_w: list[Tensor] = []
        start = 0
        for e, n in enumerate(counts):
            w_gate_up, w_down = weights[2 * e], weights[2 * e + 1]
            rows, dy = slice(start, start + n), grad_out[start:start + n]
            w = route_w[rows] if ctx.has_w else None
            h, act = saved[2 * e], saved[2 * e + 1]
            d_h, d_w = _act_bwd(h, w, torch.mm(dy, w_down))
            if grad_route is not None:
                grad_route[rows] = d_w
            # Frozen experts (requires_grad=False) need no weight GEMMs.
            need_gu, need_down = ctx.needs_input_grad[4 + 2 * e], ctx.needs_input_grad[5 + 2 * e]
            torch.mm(d_h, w_gate_up, out=grad_x[rows])  # every row: the input gradient is never masked
            xr = x[rows]
            if ctx.keep is not None:  # masked rows teach the expert nothing: weight GEMMs over kept rows only
                kept = torch.nonzero(ctx.keep[rows]).flatten()
                d_h, dy, xr, act = d_h[kept], dy[kept], xr[kept], act[kept]
            grad_w.extend((torch.mm(d_h.t(), xr) if need_gu else None,
                           torch.mm(dy.t(), act) if need_down else None))
            start += n
        if grad_route is not None:
            grad_route = grad_route.to(route_w.dtype)
        return (grad_x, grad_route, None, None, *grad_w)


def grouped_swiglu(x: Tensor, counts: list[int], experts, route_w: Optional[Tensor] = None,
                   keep: Optional[Tensor] = None) -> Tensor:
    """Run SwiGLU experts on consecutive row blocks of ``x`` (``counts`` rows each),
    scaling each row's output by ``route_w`` when given; rows with ``keep`` False
    add nothing to the experts' weight gradients."""
    weights = [w for e in experts for w in (e.gate_up.weight, e.down.weight)]
    return GroupedSwiGLU.apply(x, route_w, keep, counts, *weights)
