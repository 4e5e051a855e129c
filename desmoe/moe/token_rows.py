"""Token mode's row moves for the loop backend of ``desmoe.moe.grouped``: one expert's row block gathered from
token order into a scratch before its first GEMM, and its last GEMM's rows added back into a token-order
float32 sum after it.  Each returns a function that moves rows [r0, r1) of the blocks, so the per-expert loop
makes one call per block: on CPU one C call (``desmoe.kernels.rows_cpu``, the buffers checked once),
elsewhere a torch op.  (``desmoe.moe.permutation`` moves the whole batch at once instead.)"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from desmoe.kernels import RowKernels, rows_cpu


def row_kernels(t: Tensor) -> Optional[RowKernels]:
    """The CPU row kernels where they exist and take ``t``; else None (the torch ops)."""
    rows = rows_cpu() if t.device.type == "cpu" else None
    return rows if rows is not None and RowKernels.supports(t) else None


def gather_rows(src: Tensor, idx: Tensor, dst: Tensor):
    """``run(r0, r1)``: ``dst[:r1 - r0] = src[idx[r0:r1]]`` (one C call on CPU)."""
    kernels = row_kernels(src)
    if kernels is not None:
        return kernels.gather_rows(src, idx, dst)
    return lambda r0, r1: torch.index_select(src, 0, idx[r0:r1], out=dst[:r1 - r0])


def scatter_add_rows(src: Tensor, idx: Tensor, acc: Tensor):
    """``(run, finish)``: ``run(r0, r1)`` adds ``src[:r1 - r0]`` into the float32 ``acc`` at rows
    ``idx[r0:r1]``, ``acc`` uninitialised before the first call; ``finish()`` after the last (one C call
    each on CPU: the first row of a token is stored, and finish zeroes the tokens no row reached)."""
    kernels = row_kernels(src)
    if kernels is not None:
        return kernels.scatter_add_rows(src, idx, acc)
    acc.zero_()
    return (lambda r0, r1: acc.index_add_(0, idx[r0:r1], src[:r1 - r0].to(acc.dtype))), (lambda: None)
