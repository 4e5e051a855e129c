"""Token order <-> expert order: the dispatch's row gather and the combine's k-way sum.

A batch of S tokens with k routes each is sorted by expert into N <= k*S rows (capacity drops
leave routes out) (:class:`RoutePlan`).  ``token_of_route[i]`` is the token of sorted row i;
``pos[j, t]`` is the sorted row of token t's j-th choice, or -1 when that route was dropped.  The two operations are
each other's adjoint:

* ``permute``:   rows[i] = x[token_of_route[i]];      backward: grad_x[t] = sum_j grad_rows[pos[j, t]]
* ``unpermute``: out[t]  = sum_j rows[pos[j, t]];     backward: grad_rows[i] = grad_out[token_of_route[i]]

so forward and backward are each a gather or a gather-sum: one pass, no zero-filled buffer and no
scatter.  On CPU they run as C loops (``desmoe.kernels.rows_cpu``), every sum accumulated in fp32.
Elsewhere, or without the kernels, they are torch's ``index_select`` and an ``index_add_`` into zeros:
the combine sums in fp32 (a bf16 model's combine does not round per route), the dispatch's backward in
the gradient's dtype, as autograd's ``index_select`` backward does (an fp32 copy of a bf16 gradient
would add k * tokens * d * 4 bytes at the step's peak on a GPU).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from desmoe.kernels import RowKernels, rows_cpu


class RoutePlan:
    """The sorted routes of one forward.  ``order``: route ids (choice-major, r = j * S + t) sorted by
    expert, dropped routes left out; ``token_of_route``: the token of each sorted row; ``pos`` [k, S]:
    each route's sorted row, -1 if dropped.  ``pos`` is built on first use, once per forward: only the
    CPU kernels read it (torch's ops scatter by ``token_of_route``), so a GPU step never builds it."""

    def __init__(self, order: Tensor, num_tokens: int, k: int) -> None:
        self.order, self.num_tokens, self.k = order, num_tokens, k
        self.token_of_route = order % num_tokens
        self._pos: Optional[Tensor] = None

    @property
    def pos(self) -> Tensor:
        if self._pos is None:
            pos = torch.full((self.k * self.num_tokens,), -1, dtype=torch.long, device=self.order.device)
            pos[self.order] = torch.arange(self.order.numel(), device=self.order.device)
            self._pos = pos.view(self.k, self.num_tokens)
        return self._pos


def _kernels(t: Tensor) -> Optional[RowKernels]:
    rows = rows_cpu() if t.device.type == "cpu" else None
    return rows if rows is not None and RowKernels.supports(t) else None


def _gather(src: Tensor, plan: RoutePlan) -> Tensor:
    kernels = _kernels(src)
    idx = plan.token_of_route
    return kernels.gather(src, idx) if kernels is not None else src.index_select(0, idx)


def _gather_sum(src: Tensor, plan: RoutePlan, out_dtype: torch.dtype, fp32: bool = True) -> Tensor:
    """``fp32``: the torch ops accumulate in fp32 (else in ``src``'s dtype); the C loops always do."""
    kernels = _kernels(src)
    if kernels is not None:
        return kernels.gather_sum(src, plan.pos).to(out_dtype)
    acc = torch.float32 if fp32 else src.dtype
    out = torch.zeros((plan.num_tokens, src.shape[1]), dtype=acc, device=src.device)
    # in place on the fresh buffer (out-of-place index_add would copy it first)
    return out.index_add_(0, plan.token_of_route, src.to(acc)).to(out_dtype)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: RoutePlan) -> Tensor:  # type: ignore[override]
        ctx.plan, ctx.dtype = plan, x.dtype  # index tensors, never modified: no version check needed
        return _gather(x, plan)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _gather_sum(grad, ctx.plan, ctx.dtype, fp32=False), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, plan: RoutePlan, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.plan, ctx.dtype = plan, rows.dtype
        return _gather_sum(rows, plan, out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _gather(grad.contiguous(), ctx.plan).to(ctx.dtype), None, None


def permute(x: Tensor, plan: RoutePlan) -> Tensor:
    """[S, d] tokens -> [N, d] rows in expert order (``x[plan.token_of_route]``)."""
    return _Permute.apply(x, plan)


def unpermute(rows: Tensor, plan: RoutePlan, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """[N, d] rows in expert order -> [S, d] tokens, each the sum of its routes' rows (returned in
    ``out_dtype``, default the rows' dtype)."""
    return _Unpermute.apply(rows, plan, out_dtype or rows.dtype)
