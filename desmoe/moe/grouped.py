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

from desmoe.kernels import expert_loop_cpu, swiglu_cpu
from desmoe.moe.token_rows import gather_rows, row_kernels, scatter_add_rows

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


def _expert_loop(x: Tensor, weights):
    loop = expert_loop_cpu() if x.device.type == "cpu" else None
    return loop if loop is not None and loop.supports(x, weights) else None


def _loop_forward(x: Tensor, route_w: Optional[Tensor], counts: list[int], token_of_row: Optional[Tensor],
                  weights) -> tuple[Tensor, Tensor]:
    """GroupedSwiGLU's forward as the Python loop over ``torch.mm``: (out, the pre-activations [N, 2f])."""
    tokens = token_of_row is not None
    two_f, d = weights[0].shape
    m = max(counts, default=0)
    h_all = x.new_empty((sum(counts), two_f))  # pre-activations, gate | up, all experts' rows
    scratch = x.new_empty((m, two_f // 2))  # one expert's (weighted) activation
    act = _act_fwd_rows(h_all, route_w, scratch)
    hs = h_all.split(counts)
    if tokens:  # x and the output in token order: one expert's rows at a time through two scratches
        x_rows, y_rows = x.new_empty((m, d)), x.new_empty((m, d))
        acc = torch.empty((x.shape[0], d), dtype=torch.float32, device=x.device)  # the k-way sum, in fp32
        gather = gather_rows(x, token_of_row, x_rows)
        combine, combined = scatter_add_rows(y_rows, token_of_row, acc)
    else:
        out = x.new_empty(x.shape)
        xs, outs = x.split(counts), out.split(counts)
    start = 0
    for e, n in enumerate(counts):
        if n:  # an expert without rows has nothing to compute (its weight gradients are zeros)
            if tokens:
                gather(start, start + n)
            xe, ye = (x_rows[:n], y_rows[:n]) if tokens else (xs[e], outs[e])
            torch.mm(xe, weights[2 * e].t(), out=hs[e])
            act(start, start + n, 0)
            torch.mm(scratch[:n], weights[2 * e + 1].t(), out=ye)
            if tokens:
                combine(start, start + n)
        start += n
    if tokens:
        combined()
    return (acc.to(x.dtype) if tokens else out), h_all


def fuses_rows(x: Tensor, experts) -> bool:
    """Whether the dispatcher hands the experts token-order rows (``token_of_row``): always for the
    grouped_mm backend (the gather and the combine are then whole-batch torch ops inside it, and the
    gathered rows are not kept for backward); for the loop backend where the CPU row kernels exist (one
    call per expert).  Elsewhere (the loop on a GPU or without a compiler, where a per-expert torch op
    would cost more than the pass) the dispatcher gathers and combines around the experts
    (``desmoe.moe.permutation``)."""
    return grouped_mm_supported(x, experts) or row_kernels(x) is not None


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

    Token mode (``token_of_row`` given): ``x`` and the output are in token order, and each expert's rows
    are gathered into a scratch just before its first GEMM and its last GEMM's rows added into the
    token-order output (in fp32) just after; the backward does the same with the incoming gradient and the
    input gradient.  The dispatch's and the combine's expert-order [N, d] buffers, written to memory and
    read back cold, are gone, and the forward keeps x once (a linear router keeps the same tensor)
    instead of its k gathered copies.  A token's k routes then sum in expert order instead of choice
    order: the same value for k = 2, within a rounding for more.

    In fp32 on a CPU whose torch links MKL, the same loop runs as one C call each way, the forward in row
    tiles where that pays (``desmoe.kernels.experts``); this Python loop is the path for bf16, other BLAS
    builds, and ``DESMOE_EXPERT_LOOP=0``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, route_w: Optional[Tensor], keep: Optional[Tensor],  # type: ignore[override]
                counts: list[int], token_of_row: Optional[Tensor], *weights: Tensor) -> Tensor:
        tokens = token_of_row is not None
        ctx.counts, ctx.has_w, ctx.keep, ctx.tokens, ctx.used = counts, route_w is not None, keep, tokens, False
        loop, ctx.loop = _expert_loop(x, weights), None
        if loop is not None or tokens:
            x = x.contiguous()  # the C code reads whole rows through the pointer (a no-op for the block's x)
        if loop is not None:  # the same loop in one C call (desmoe.kernels.experts), on whole rows
            ctx.loop = loop, loop.bind(x, counts, weights, token_of_row)  # checked once for both directions
            out, h_all = loop.forward(x, counts, weights, route_w, token_of_row, bound=ctx.loop[1])
        else:
            out, h_all = _loop_forward(x, route_w, counts, token_of_row, weights)
        empty = x.new_empty(0)
        ctx.save_for_backward(x, route_w if route_w is not None else empty, h_all,
                              token_of_row if tokens else empty, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if ctx.used:  # its first backward overwrote the pre-activations with their gradient
            raise RuntimeError("desmoe MoE experts (loop backend): a second backward through one forward "
                               "(retain_graph=True) is not supported; run the forward again")
        ctx.used = True
        counts, tokens = ctx.counts, ctx.tokens
        x, route_w, h_all, token_of_row, *weights = ctx.saved_tensors
        if ctx.loop is not None:  # the forward ran the C loop: so does its backward
            loop, bound = ctx.loop
            grad_x, grad_route, grad_w = loop.backward(x, counts, weights, route_w if ctx.has_w else None,
                                                       token_of_row if tokens else None, h_all, grad_out,
                                                       ctx.keep, ctx.needs_input_grad[5:], bound=bound)
            return (grad_x, grad_route.to(route_w.dtype) if grad_route is not None else None, None, None, None,
                    *grad_w)
        grad_out = grad_out.contiguous()
        m, d = max(counts, default=0), x.shape[1]
        scratch = x.new_empty((m, h_all.shape[1] // 2))  # d_act, then the activation
        grad_route = torch.empty(h_all.shape[0], dtype=torch.float32, device=x.device) if ctx.has_w else None
        act_bwd = _act_bwd_inplace_rows(h_all, route_w if ctx.has_w else None, scratch, grad_route)
        d_hs = h_all.split(counts)
        if tokens:  # dy gathered per expert; the input gradient summed into token order, then x re-gathered
            dy_rows, rows = x.new_empty((m, d)), x.new_empty((m, d))
            grad_acc = torch.empty((x.shape[0], d), dtype=torch.float32, device=x.device)
            gather_dy, gather_x = gather_rows(grad_out, token_of_row, dy_rows), gather_rows(x, token_of_row, rows)
            scatter_gx, scattered = scatter_add_rows(rows, token_of_row, grad_acc)
        else:
            grad_x = torch.empty_like(x)
            dys, gxs, xs = (t.split(counts) for t in (grad_out, grad_x, x))
        need = ctx.needs_input_grad[5:]
        grad_w: list[Optional[Tensor]] = []
        start = 0
        for e, n in enumerate(counts):
            w_gate_up, w_down = weights[2 * e], weights[2 * e + 1]
            d_act = scratch[:n]
            dy, xr = (dy_rows[:n], rows[:n]) if tokens else (dys[e], xs[e])
            if n:
                if tokens:
                    gather_dy(start, start + n)
                torch.mm(dy, w_down, out=d_act)
                act_bwd(start, start + n)  # d_hs[e] now holds d_h, d_act the activation
                torch.mm(d_hs[e], w_gate_up, out=rows[:n] if tokens else gxs[e])  # never masked
                if tokens:
                    scatter_gx(start, start + n)
                    gather_x(start, start + n)  # into the same scratch, now free
            # Frozen experts (requires_grad=False) need no weight GEMMs.
            d_h, act = d_hs[e], d_act
            if ctx.keep is not None and n and x.device.type == "cpu":  # masked rows teach the expert nothing:
                kept = torch.nonzero(ctx.keep[start:start + n]).flatten()  # weight GEMMs over kept rows only
                d_h, dy, xr, act = d_h[kept], dy[kept], xr[kept], act[kept]
            elif ctx.keep is not None and n:  # on a GPU nonzero would wait for it once per expert: masked rows
                kept = ctx.keep[start:start + n].unsqueeze(1)  # add exact zeros instead (as in grouped_mm)
                d_h, dy = d_h * kept, dy * kept
            grad_w.extend((torch.mm(d_h.t(), xr) if need[2 * e] else None,
                           torch.mm(dy.t(), act) if need[2 * e + 1] else None))
            start += n
        if grad_route is not None:
            grad_route = grad_route.to(route_w.dtype)
        if tokens:
            scattered()
            grad_x = grad_acc.to(x.dtype)
        return (grad_x, grad_route, None, None, None, *grad_w)


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
                counts: Tensor, token_of_row: Optional[Tensor], *weights: Tensor) -> Tensor:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # group ends, on the device
        w_gate_up, w_down = torch.stack(weights[0::2]), torch.stack(weights[1::2])  # [E, 2f, d], [E, d, f]
        # Token mode: the dispatch's gather here, and not kept for backward (it gathers again there).
        rows = x if token_of_row is None else x.index_select(0, token_of_row)
        h = _gmm(rows, w_gate_up.transpose(1, 2), offs)  # [N, 2f]
        act = _act_fwd(h, route_w)
        out = _gmm(act, w_down.transpose(1, 2), offs)  # [N, d]
        if token_of_row is not None:  # the combine: each token's rows summed in fp32 (as desmoe.moe.permutation)
            out = torch.zeros((x.shape[0], out.shape[1]), dtype=torch.float32, device=x.device).index_add_(
                0, token_of_row, out.float()).to(x.dtype)
        ctx.has_w = route_w is not None
        ctx.num_experts = len(counts)
        ctx.tokens = token_of_row is not None
        empty = x.new_empty(0)
        ctx.save_for_backward(x, route_w if route_w is not None else empty,
                              keep if keep is not None else x.new_empty(0, dtype=torch.bool), offs, h, act,
                              token_of_row if token_of_row is not None else empty, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, route_w, keep, offs, h, act, token_of_row, *weights = ctx.saved_tensors
        w = route_w if ctx.has_w else None
        dy = grad_out.contiguous()
        if ctx.tokens:
            dy = dy.index_select(0, token_of_row)
        w_gate_up, w_down = torch.stack(weights[0::2]), torch.stack(weights[1::2])
        d_h, d_w = _act_bwd(h, w, _gmm(dy, w_down, offs))
        grad_x = _gmm(d_h, w_gate_up, offs)  # every row: the input gradient is never masked
        if ctx.tokens:  # each token's rows summed in the gradient's dtype (as the dispatch's backward on torch ops)
            grad_x = torch.zeros_like(x, dtype=grad_x.dtype).index_add_(0, token_of_row, grad_x)
        grad_route = d_w.to(route_w.dtype) if ctx.has_w else None
        need = ctx.needs_input_grad[5:]
        grad_w: list[Optional[Tensor]] = [None] * len(weights)
        if any(need):
            if keep.numel():  # masked rows add exact zeros to the weight sums: no host sync to select rows
                d_h, dy = d_h * keep.unsqueeze(1), dy * keep.unsqueeze(1)
            rows = x.index_select(0, token_of_row) if ctx.tokens and any(need[0::2]) else x
            # Frozen experts still share the kernel; their slices are dropped.
            g_gate_up = _gmm(d_h.t(), rows, offs) if any(need[0::2]) else None  # [E, 2f, d]
            g_down = _gmm(dy.t(), act, offs) if any(need[1::2]) else None  # [E, d, f]
            # An expert without rows has a zero weight gradient, but a 2-D x 2-D grouped GEMM need not write
            # an empty group's slice (on Blackwell it was seen holding garbage: pytorch/pytorch#172439):
            # zeroed here from the offsets on the device, no host sync.
            empty = (torch.diff(offs, prepend=offs.new_zeros(1)) == 0).view(-1, 1, 1)
            for g in (g_gate_up, g_down):
                if g is not None:
                    g.masked_fill_(empty, 0)
            for e in range(ctx.num_experts):
                if need[2 * e]:
                    grad_w[2 * e] = g_gate_up[e]
                if need[2 * e + 1]:
                    grad_w[2 * e + 1] = g_down[e]
        return (grad_x, grad_route, None, None, None, *grad_w)


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
                   keep: Optional[Tensor] = None, backend: str = "auto",
                   token_of_row: Optional[Tensor] = None) -> Tensor:
    """Run SwiGLU experts on consecutive row blocks of ``x`` (``counts`` rows each: a list or
    an integer tensor), scaling each row's output by ``route_w`` when given; rows with
    ``keep`` False add nothing to the experts' weight gradients.

    ``token_of_row`` [N] (int64): ``x`` is [S, d] in token order and row i of the blocks is
    ``x[token_of_row[i]]``; the result is [S, d], each token the sum of its rows' outputs (summed in fp32),
    and the gathered rows are not kept for backward.

    ``backend``: ``auto`` (grouped_mm where :func:`grouped_mm_supported`, else loop),
    ``loop`` or ``grouped_mm`` (forced, e.g. to test its math on a CPU)."""
    if backend == "auto":
        backend = "grouped_mm" if grouped_mm_supported(x, experts) else "loop"
    weights = [w for e in experts for w in (e.gate_up.weight, e.down.weight)]
    if backend not in ("loop", "grouped_mm"):
        raise ValueError(f"unknown grouped_swiglu backend '{backend}' (auto, loop, grouped_mm)")
    if backend == "grouped_mm":
        counts_t = counts if isinstance(counts, Tensor) else torch.tensor(list(counts))
        # (a device tensor's row count is not checked against token_of_row: reading it waits for the device)
        _check_token_of_row(token_of_row, None if isinstance(counts, Tensor) else sum(counts))
        return GroupedMMSwiGLU.apply(x, route_w, keep, counts_t.to(x.device), token_of_row, *weights)
    counts_l = counts.tolist() if isinstance(counts, Tensor) else list(counts)  # the loop needs host ints
    _check_token_of_row(token_of_row, sum(counts_l))
    return GroupedSwiGLU.apply(x, route_w, keep, counts_l, token_of_row, *weights)


def _check_token_of_row(token_of_row: Optional[Tensor], rows: Optional[int]) -> None:
    if token_of_row is not None and (token_of_row.dim() != 1 or (rows is not None and token_of_row.shape[0] != rows)):
        raise ValueError(f"grouped_swiglu: token_of_row must have one entry per row ({rows}), "
                         f"got shape {tuple(token_of_row.shape)}")
