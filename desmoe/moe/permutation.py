"""Token order <-> expert order: the dispatch's row gather and the combine's k-way sum.

A batch of S tokens with k routes each is sorted by expert into N <= k*S rows (capacity drops
leave routes out).  ``token_of_route[i]`` is the token of sorted row i; ``pos[j, t]`` is the
sorted row of token t's j-th choice, or -1 when that route was dropped.  The two operations are
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


def route_positions(order: Tensor, num_tokens: int, k: int) -> Tensor:
    """[k, S] sorted row of each route (routes numbered choice-major, r = j * S + t), -1 if dropped."""
    pos = torch.full((k * num_tokens,), -1, dtype=torch.long, device=order.device)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return pos.view(k, num_tokens)


def _kernels(t: Tensor) -> Optional[RowKernels]:
    rows = rows_cpu() if t.device.type == "cpu" else None
    return rows if rows is not None and RowKernels.supports(t) else None


def _gather(src: Tensor, idx: Tensor) -> Tensor:
    kernels = _kernels(src)
    return kernels.gather(src, idx) if kernels is not None else src.index_select(0, idx)


def _gather_sum(src: Tensor, pos: Tensor, token_of_route: Tensor, out_dtype: torch.dtype,
                fp32: bool = True) -> Tensor:
    """``fp32``: the torch ops accumulate in fp32 (else in ``src``'s dtype); the C loops always do."""
    kernels = _kernels(src)
    if kernels is not None:
        return kernels.gather_sum(src, pos).to(out_dtype)
    acc = torch.float32 if fp32 else src.dtype
    out = torch.zeros((pos.shape[1], src.shape[1]), dtype=acc, device=src.device)
    # in place on the fresh buffer (out-of-place index_add would copy it first)
    return out.index_add_(0, token_of_route, src.to(acc)).to(out_dtype)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, token_of_route: Tensor, pos: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(token_of_route, pos)
        ctx.dtype = x.dtype
        return _gather(x, token_of_route)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        token_of_route, pos = ctx.saved_tensors
        return _gather_sum(grad, pos, token_of_route, ctx.dtype, fp32=False), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, token_of_route: Tensor, pos: Tensor,  # type: ignore[override]
                out_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(token_of_route, pos)
        ctx.dtype = rows.dtype
        return _gather_sum(rows, pos, token_of_route, out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        token_of_route, _ = ctx.saved_tensors
        return _gather(grad.contiguous(), token_of_route).to(ctx.dtype), None, None, None


def permute(x: Tensor, token_of_route: Tensor, pos: Tensor) -> Tensor:
    """[S, d] tokens -> [N, d] rows in expert order (``x[token_of_route]``)."""
    return _Permute.apply(x, token_of_route, pos)


def unpermute(rows: Tensor, token_of_route: Tensor, pos: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """[N, d] rows in expert order -> [S, d] tokens, each the sum of its routes' rows (fp32 accumulation,
    returned in ``out_dtype``, default the rows' dtype)."""
    return _Unpermute.apply(rows, token_of_route, pos, out_dtype or rows.dtype)
