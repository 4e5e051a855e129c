"""Grouped SwiGLU experts: one autograd node for all local experts.

Running each expert as a module costs, per step, a concat of the outputs, a
concat of the input gradients (split's backward), a concat inside every expert
(chunk's backward) and about a dozen elementwise passes for the activation and
its gradient.  Here each expert writes its output and input gradient straight
into preallocated row blocks, and the activation -- optionally scaled by each
row's route weight, which then needs no pass of its own -- runs as one fused
pass forward and one backward (``desmoe.kernels`` on CPU, torch ops elsewhere).
Same math as ``SwiGLUExpert`` followed by the weighting.

Two backends compute the same function:

* ``loop``: one GEMM per expert on its row block.  On a CPU a GEMM's launch
  costs nothing next to its work, so this is the fastest there (measured in
  ``bench/moe_block.py``); it needs the row counts on the host.
* ``grouped_mm``: ``torch._grouped_mm``, one kernel for all experts per GEMM
  (2 forward, 4 backward).  On a GPU the per-expert launches dominate a
  fine-grained MoE (64-128 small experts), and the row offsets stay on the
  device, so the routed path needs no host synchronisation.  Chosen
  automatically on CUDA for bf16 with 16-byte aligned widths (what the kernel
  takes); torch also runs it on CPU, which is how the tests check its math.

An optional boolean row mask ``keep`` restricts the *weight* gradients to the
kept rows, while the input and route-weight gradients still come from every row
(a caller's per-route "does this route teach the expert" decision, e.g. gradient
isolation between data sources).  Without it the code path is unchanged.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from desmoe.kernels import swiglu_cpu

Counts = Union[Sequence[int], Tensor]


def _act_fwd(h: Tensor, w: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    kernel = swiglu_cpu() if h.device.type == "cpu" else None
    if kernel is not None:
        return kernel.fwd(h, w, out)
    f = h.shape[1] // 2
    act = F.silu(h[:, :f]) * h[:, f:]
    act = act * w.unsqueeze(1) if w is not None else act
    return act if out is None else out.copy_(act)


def _act_bwd(h: Tensor, w: Optional[Tensor], d_act: Tensor, d_h_out: Optional[Tensor] = None,
             d_w_out: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Returns (d_h, d_w), written into ``d_h_out`` / ``d_w_out`` when given."""
    kernel = swiglu_cpu() if h.device.type == "cpu" else None
    if kernel is not None:
        return kernel.bwd(h, w, d_act, d_h_out, d_w_out)
    f = h.shape[1] // 2
    gate, up = h[:, :f].float(), h[:, f:].float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    act = silu * up
    d = d_act.float()
    d_w = (d * act).sum(1) if w is not None else None
    dw = d * w.float().unsqueeze(1) if w is not None else d
    d_h = torch.cat([dw * up * sig * (1 + gate * (1 - sig)), dw * silu], dim=1).to(h.dtype)
    if d_h_out is not None:
        d_h = d_h_out.copy_(d_h)
    if d_w_out is not None and d_w is not None:
        d_w = d_w_out.copy_(d_w)
    return d_h, d_w


def _act_fwd_rows(h: Tensor, w: Optional[Tensor], act: Tensor):
    """``run(r0, r1, out_row=r0)``: rows [r0, r1) of the activation of the whole buffers, written into ``act``
    from row ``out_row`` on.  On CPU one C call per row block, the buffers checked once (no per-expert
    slicing, checks or conversions)."""
    kernel = swiglu_cpu() if h.device.type == "cpu" else None
    if kernel is not None:
        return kernel.fwd_rows(h, w, act)

    def run(r0: int, r1: int, out_row: Optional[int] = None) -> None:
        o = r0 if out_row is None else out_row
        _act_fwd(h[r0:r1], w[r0:r1] if w is not None else None, act[o:o + r1 - r0])
    return run


def _act_bwd_inplace_rows(h: Tensor, w: Optional[Tensor], d_act: Tensor, d_w: Optional[Tensor]):
    """``run(r0, r1)``: the backward of rows [r0, r1) in place: d_h over ``h``'s rows, the (weighted)
    activation over ``d_act``'s rows [0, r1 - r0) (which hold the block's incoming gradient), ``d_w`` rows
    [r0, r1) when ``w`` is given."""
    kernel = swiglu_cpu() if h.device.type == "cpu" else None
    if kernel is not None:
        return kernel.bwd_inplace_rows(h, w, d_act, d_w)

    def run(r0: int, r1: int) -> None:
        hb, wb, da = h[r0:r1], (w[r0:r1] if w is not None else None), d_act[:r1 - r0]
        act = _act_fwd(hb, wb)  # the forward's ops on the same values: its activation
        _act_bwd(hb, wb, da, hb, d_w[r0:r1] if d_w is not None else None)  # d_h is built whole, then copied
        da.copy_(act)
    return run


class GroupedSwiGLU(torch.autograd.Function):
    """The ``loop`` backend: per expert GEMM -> activation -> GEMM on its row block; counts on the host.

    The row blocks are views made by one ``split`` per buffer and the activation is one C call per
    block on the whole buffers: at 128 experts the per-expert Python work (slicing, kernel-wrapper
    checks) cost more than the small experts' activation itself.  (Row tiles within an expert, so the
    activation reads its GEMM's output from cache, were measured slower twice: smaller GEMM calls.)

    Memory: the forward keeps the inputs and the pre-activations, not the activation (a third of
    what the experts kept: [N, f] of [N, d + 3f]).  It goes through one expert-sized scratch, still in
    cache for the down projection; the backward recomputes it where it is needed, in the pass that reads
    the pre-activations anyway, and writes the pre-activations' gradient over them.  So a second backward
    through one forward (``retain_graph=True``) is refused (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, x: Tensor, route_w: Optional[Tensor], keep: Optional[Tensor],  # type: ignore[override]
                counts: list[int], *weights: Tensor) -> Tensor:
        two_f = weights[0].shape[0]
        out = x.new_empty(x.shape)
        h_all = x.new_empty((x.shape[0], two_f))  # pre-activations, gate | up, all experts' rows
        scratch = x.new_empty((max(counts, default=0), two_f // 2))  # one expert's (weighted) activation
        act = _act_fwd_rows(h_all, route_w, scratch)
        xs, hs, outs = x.split(counts), h_all.split(counts), out.split(counts)
        start = 0
        for e, n in enumerate(counts):
            if n:  # an expert without rows has nothing to compute (its weight gradients are zeros)
                torch.mm(xs[e], weights[2 * e].t(), out=hs[e])
                act(start, start + n, 0)
                torch.mm(scratch[:n], weights[2 * e + 1].t(), out=outs[e])
            start += n
        ctx.counts = counts
        ctx.has_w = route_w is not None
        ctx.keep = keep  # bool, not differentiable
        ctx.used = False
        ctx.save_for_backward(x, route_w if route_w is not None else x.new_empty(0), h_all, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if ctx.used:  # its first backward overwrote the pre-activations with their gradient
            raise RuntimeError("desmoe MoE experts (loop backend): a second backward through one forward "
                               "(retain_graph=True) is not supported; run the forward again")
        ctx.used = True
        counts = ctx.counts
        x, route_w, h_all, *weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        scratch = x.new_empty((max(counts, default=0), h_all.shape[1] // 2))  # d_act, then the activation
        grad_route = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if ctx.has_w else None
        act_bwd = _act_bwd_inplace_rows(h_all, route_w if ctx.has_w else None, scratch, grad_route)
        dys, d_hs, gxs, xs = (t.split(counts) for t in (grad_out, h_all, grad_x, x))
        need = ctx.needs_input_grad[4:]
        grad_w: list[Optional[Tensor]] = []
        start = 0
        for e, n in enumerate(counts):
            w_gate_up, w_down = weights[2 * e], weights[2 * e + 1]
            d_act = scratch[:n]
            if n:
                torch.mm(dys[e], w_down, out=d_act)
                act_bwd(start, start + n)  # d_hs[e] now holds d_h, d_act the activation
                torch.mm(d_hs[e], w_gate_up, out=gxs[e])  # every row: the input gradient is never masked
            # Frozen experts (requires_grad=False) need no weight GEMMs.
            d_h, dy, xr, act = d_hs[e], dys[e], xs[e], d_act
            if ctx.keep is not None and n:  # masked rows teach the expert nothing: weight GEMMs over kept rows only
                kept = torch.nonzero(ctx.keep[start:start + n]).flatten()
                d_h, dy, xr, act = d_h[kept], dy[kept], xr[kept], act[kept]
            grad_w.extend((torch.mm(d_h.t(), xr) if need[2 * e] else None,
                           torch.mm(dy.t(), act) if need[2 * e + 1] else None))
            start += n
        if grad_route is not None:
            grad_route = grad_route.to(route_w.dtype)
        return (grad_x, grad_route, None, None, *grad_w)


def _gmm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(a, b, offs=offs)


class GroupedMMSwiGLU(torch.autograd.Function):
    """The ``grouped_mm`` backend: six grouped GEMMs per step whatever the number of experts.

    The experts' weights are separate parameters (DeepSpeed's checkpoint layout), so
    they are stacked for each GEMM; the stack is rebuilt in backward rather than
    saved, which would hold a second copy of every layer's experts until backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, route_w: Optional[Tensor], keep: Optional[Tensor],  # type: ignore[override]
                counts: Tensor, *weights: Tensor) -> Tensor:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # group ends, on the device
        w_gate_up, w_down = torch.stack(weights[0::2]), torch.stack(weights[1::2])  # [E, 2f, d], [E, d, f]
        h = _gmm(x, w_gate_up.transpose(1, 2), offs)  # [N, 2f]
        act = _act_fwd(h, route_w)
        out = _gmm(act, w_down.transpose(1, 2), offs)  # [N, d]
        ctx.has_w = route_w is not None
        ctx.num_experts = len(counts)
        ctx.save_for_backward(x, route_w if route_w is not None else x.new_empty(0),
                              keep if keep is not None else x.new_empty(0, dtype=torch.bool), offs, h, act, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, route_w, keep, offs, h, act, *weights = ctx.saved_tensors
        w = route_w if ctx.has_w else None
        dy = grad_out.contiguous()
        w_gate_up, w_down = torch.stack(weights[0::2]), torch.stack(weights[1::2])
        d_h, d_w = _act_bwd(h, w, _gmm(dy, w_down, offs))
        grad_x = _gmm(d_h, w_gate_up, offs)  # every row: the input gradient is never masked
        grad_route = d_w.to(route_w.dtype) if ctx.has_w else None
        need = ctx.needs_input_grad[4:]
        grad_w: list[Optional[Tensor]] = [None] * len(weights)
        if any(need):
            if keep.numel():  # masked rows add exact zeros to the weight sums: no host sync to select rows
                d_h, dy = d_h * keep.unsqueeze(1), dy * keep.unsqueeze(1)
            # Frozen experts still share the kernel; their slices are dropped.
            g_gate_up = _gmm(d_h.t(), x, offs) if any(need[0::2]) else None  # [E, 2f, d]
            g_down = _gmm(dy.t(), act, offs) if any(need[1::2]) else None  # [E, d, f]
            for e in range(ctx.num_experts):
                if need[2 * e]:
                    grad_w[2 * e] = g_gate_up[e]
                if need[2 * e + 1]:
                    grad_w[2 * e + 1] = g_down[e]
        return (grad_x, grad_route, None, None, *grad_w)


def grouped_mm_supported(x: Tensor, experts) -> bool:
    """Whether ``auto`` picks the grouped_mm backend: CUDA, bf16 (the kernel's dtype), widths whose rows
    are 16-byte aligned, and not switched off with ``DESMOE_GROUPED_MM=0``."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    if x.shape[0] == 0:  # a rank that received no rows (EP): nothing to launch, the loop handles it
        return False
    if os.environ.get("DESMOE_GROUPED_MM", "1") == "0":
        return False
    d, two_f = x.shape[1], experts[0].gate_up.weight.shape[0]
    return d % 8 == 0 and two_f % 16 == 0


def grouped_swiglu(x: Tensor, counts: Counts, experts, route_w: Optional[Tensor] = None,
                   keep: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Run SwiGLU experts on consecutive row blocks of ``x`` (``counts`` rows each: a list or
    an integer tensor), scaling each row's output by ``route_w`` when given; rows with
    ``keep`` False add nothing to the experts' weight gradients.

    ``backend``: ``auto`` (grouped_mm where :func:`grouped_mm_supported`, else loop),
    ``loop`` or ``grouped_mm`` (forced, e.g. to test its math on a CPU)."""
    if backend == "auto":
        backend = "grouped_mm" if grouped_mm_supported(x, experts) else "loop"
    weights = [w for e in experts for w in (e.gate_up.weight, e.down.weight)]
    if backend == "grouped_mm":
        counts_t = counts if isinstance(counts, Tensor) else torch.tensor(list(counts))
        return GroupedMMSwiGLU.apply(x, route_w, keep, counts_t.to(x.device), *weights)
    if backend != "loop":
        raise ValueError(f"unknown grouped_swiglu backend '{backend}' (auto, loop, grouped_mm)")
    counts_l = counts.tolist() if isinstance(counts, Tensor) else list(counts)  # the loop needs host ints
    return GroupedSwiGLU.apply(x, route_w, keep, counts_l, *weights)
