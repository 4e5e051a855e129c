"""``experts.c``: the loop backend's whole per-expert loop (GEMMs, activation, row passes) in one C call each
way, in row tiles, on the MKL torch's own CPU ``mm`` calls.

Used where torch's BLAS is Intel MKL (its x86 wheels link it and export the LP64 ``sgemm_`` and the packed-GEMM
routines): another BLAS may take 64-bit integers under the same names, which cannot be told from outside.  Elsewhere,
and for bfloat16, the Python loop in ``desmoe.moe.grouped`` runs the same steps through ``torch.mm``.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


BLAS = ("sgemm_", "cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute")


def torch_blas() -> Optional[tuple[int, ...]]:
    """The addresses of MKL's ``BLAS`` routines inside torch's CPU library, or None."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in BLAS)
    except (OSError, AttributeError):
        return None


class Bound(NamedTuple):
    """Checked sizes (rows, hidden, expert width) and the experts' weight pointer arrays."""
    n: int
    d: int
    f: int
    w13: ctypes.Array
    w2: ctypes.Array


class ExpertLoop:
    """Forward and backward of ``GroupedSwiGLU`` (``desmoe.moe.grouped``) for float32 CPU tensors."""

    def __init__(self, lib: ctypes.CDLL, blas: tuple[int, ...]) -> None:
        lib.experts_set_blas.argtypes, lib.experts_set_blas.restype = [_P] * 4, ctypes.c_int
        lib.experts_fwd_f32.argtypes = [_P, _P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _P, _P, _I64, _I64]
        lib.experts_bwd_f32.argtypes = [_P, _P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _P, _P, _P, _I64, _P, _P, _P,
                                        _P]
        lib.experts_fwd_f32.restype = lib.experts_bwd_f32.restype = ctypes.c_int
        if not lib.experts_set_blas(*blas):
            raise RuntimeError("MKL's sgemm or packed-GEMM routines missing")
        self.lib = lib

    @staticmethod
    def supports(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
                and all(w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() for w in weights))

    @staticmethod
    def _shapes(x, counts, weights, token_of_row):
        two_f, d = weights[0].shape
        for i, w in enumerate(weights):  # the C loop reads whole rows through raw pointers
            want = (two_f, d) if i % 2 == 0 else (d, two_f // 2)
            if tuple(w.shape) != want or not w.is_contiguous():
                raise ValueError(f"expert weight {i}: expected a contiguous {want} tensor, got {tuple(w.shape)}")
        n = sum(counts)
        if x.shape[1] != d or (token_of_row is None and x.shape[0] != n):
            raise ValueError(f"expert rows: expected [{n if token_of_row is None else 'tokens'}, {d}], "
                             f"got {tuple(x.shape)}")
        if token_of_row is not None:
            from desmoe.kernels import _checked_index
            _checked_index(token_of_row, x.shape[0])
            if token_of_row.shape[0] != n:
                raise ValueError(f"token_of_row: expected {n} entries, got {token_of_row.shape[0]}")
        return n, d, two_f // 2

    def bind(self, x, counts: list[int], weights, token_of_row: Optional[torch.Tensor]) -> "Bound":
        """The checks of the rows and weights and the weights' pointer arrays, done once for a forward and
        its backward (at 128 experts they cost about 0.15 ms a call; ``GroupedSwiGLU`` keeps the result)."""
        n, d, f = self._shapes(x, counts, weights, token_of_row)
        e = len(weights) // 2
        return Bound(n, d, f, (_P * e)(*[w.data_ptr() for w in weights[0::2]]),
                     (_P * e)(*[w.data_ptr() for w in weights[1::2]]))

    def forward(self, x, counts: list[int], weights, route_w: Optional[torch.Tensor],
                token_of_row: Optional[torch.Tensor], tile_bytes: int = 0,
                bound: Optional["Bound"] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (out, the pre-activations [N, 2f]): out is [S, d] (token order) or [N, d].  ``tile_bytes``:
        the forward's row tiles (0: the C file's default; tests make them small to cross tile edges).
        ``bound``: :meth:`bind` of these arguments (x contiguous), else it is done here."""
        x = x.contiguous()
        n, d, f, w13, w2 = bound or self.bind(x, counts, weights, token_of_row)
        h_all, out = x.new_empty((n, 2 * f)), x.new_empty(x.shape)
        route_w = _f32(route_w, n)
        _check(self.lib.experts_fwd_f32(
            x.data_ptr(), _ptr(token_of_row), token_of_row is not None, (_I64 * len(counts))(*counts), len(counts),
            w13, w2, _ptr(route_w), d, f, h_all.data_ptr(), out.data_ptr(), x.shape[0], tile_bytes))
        return out, h_all

    def backward(self, x, counts: list[int], weights, route_w, token_of_row, h_all, grad_out, keep,
                 need: Sequence[bool], bound: Optional["Bound"] = None):
        """Returns (grad_x, grad_route or None, [grad_w per weight or None]); ``h_all`` is overwritten.
        ``bound``: the forward's :meth:`bind`, else it is done here."""
        n, d, f, w13, w2 = bound or self.bind(x, counts, weights, token_of_row)
        grad_out = grad_out.contiguous()
        if tuple(grad_out.shape) != tuple(x.shape) or tuple(h_all.shape) != (n, 2 * f) or not h_all.is_contiguous():
            raise ValueError(f"expert backward: gradient {tuple(grad_out.shape)} / pre-activations "
                             f"{tuple(h_all.shape)} do not match rows {tuple(x.shape)}")
        if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (n,)):
            raise ValueError(f"keep: expected a bool [{n}] mask, got {keep.dtype} {tuple(keep.shape)}")
        keep = keep.contiguous() if keep is not None else None
        grads = [torch.empty_like(w) if need[i] else None for i, w in enumerate(weights)]
        e = len(counts)
        g13, g2 = (_P * e)(*[_ptr(g) for g in grads[0::2]]), (_P * e)(*[_ptr(g) for g in grads[1::2]])
        grad_x = torch.empty_like(x)
        route_w = _f32(route_w, n)
        grad_route = torch.empty(n, dtype=torch.float32) if route_w is not None else None
        _check(self.lib.experts_bwd_f32(
            x.data_ptr(), _ptr(token_of_row), token_of_row is not None, (_I64 * e)(*counts), e, w13, w2,
            _ptr(route_w), d, f, h_all.data_ptr(), grad_out.data_ptr(), grad_x.data_ptr(), x.shape[0],
            _ptr(grad_route), _ptr(keep), g13, g2))
        return grad_x, grad_route, grads


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError("desmoe expert loop: " + ("BLAS not set" if rc == -1 else "out of memory for its scratch"))


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return t.data_ptr() if t is not None else None


def _f32(w: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if w is None:
        return None
    if tuple(w.shape) != (n,):
        raise ValueError(f"route weights: expected [{n}], got {tuple(w.shape)}")
    return w.contiguous().to(torch.float32)
