"""Fused CPU kernels: plain C, compiled once per machine type, called through ctypes.

The C files (``swiglu.c``: the SwiGLU activation; ``rows.c``: the MoE dispatch's and combine's row
permutations; ``experts.c``: the loop backend's expert loop, see ``experts.py``) need no torch headers,
so they build in about a second into one library with the system's C compiler (``library.py``; at setup by
``python -m desmoe.prebuild``, else on first use) into ``$TORCH_EXTENSIONS_DIR/desmoe/``.  The build is
keyed by the CPU's feature flags because it uses ``-march=native``.  Calls run on the calling thread
(see the C file for the measurement; a Python thread pool was slower too, as torch's OpenMP workers keep
spinning on the cores after each GEMM).  ``swiglu_cpu()``, ``rows_cpu()`` and ``expert_loop_cpu()``
return None when the kernels cannot be used (no compiler, ``DESMOE_FUSED_KERNELS=0``; the last also
without torch's MKL, or with ``DESMOE_EXPERT_LOOP=0``); callers then use
torch ops with the same math.
"""
from __future__ import annotations

import ctypes
import os
import platform
import warnings
from pathlib import Path
from typing import Optional

import torch

from desmoe.kernels.library import HEADERS, SOURCES, _cflags, _cpu_key, build, compiler_problem  # noqa: F401

_lib: Optional["SwiGLUKernels"] = None
_rows: Optional["RowKernels"] = None
_loop = None  # experts.ExpertLoop
_tried = False


class SwiGLUKernels:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for name in ("swiglu_fwd_f32", "swiglu_fwd_bf16"):
            getattr(lib, name).argtypes = [p, p, p, i64, i64, i64]
        for name in ("swiglu_bwd_f32", "swiglu_bwd_bf16"):
            getattr(lib, name).argtypes = [p, p, p, p, p, i64, i64, i64]
        for name in ("swiglu_bwd_inplace_f32", "swiglu_bwd_inplace_bf16"):
            getattr(lib, name).argtypes = [p, p, p, p, i64, i64, i64]
        self.lib = lib

    def _run(self, fn, n: int, *args) -> None:
        fn(*args[:-1], 0, n, args[-1])

    def _suffix(self, h: torch.Tensor) -> str:
        if h.dtype == torch.float32:
            return "f32"
        if h.dtype == torch.bfloat16:
            return "bf16"
        raise TypeError(f"fused SwiGLU supports float32 and bfloat16, not {h.dtype}")

    def fwd(self, h: torch.Tensor, w: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out``: a contiguous [n, f] tensor of h's dtype to write into (a row block of a larger buffer)."""
        h = h.contiguous()
        n, f = h.shape[0], h.shape[1] // 2
        act = h.new_empty((n, f)) if out is None else _checked_out(out, (n, f), h.dtype)
        w = w.contiguous().to(h.dtype) if w is not None else None
        fn = getattr(self.lib, f"swiglu_fwd_{self._suffix(h)}")
        self._run(fn, n, h.data_ptr(), w.data_ptr() if w is not None else None, act.data_ptr(), f)
        return act

    def bwd(self, h: torch.Tensor, w: Optional[torch.Tensor], d_act: torch.Tensor,
            d_h: Optional[torch.Tensor] = None, d_w: Optional[torch.Tensor] = None):
        """Returns (d_h, d_w); d_w is None without w.  ``d_h`` [n, 2f] (h's dtype) and ``d_w`` [n]
        (float32): contiguous tensors to write into instead of new ones."""
        h, d_act = h.contiguous(), d_act.contiguous().to(h.dtype)
        n, f = h.shape[0], h.shape[1] // 2
        d_h = torch.empty_like(h) if d_h is None else _checked_out(d_h, tuple(h.shape), h.dtype)
        w = w.contiguous().to(h.dtype) if w is not None else None
        if w is None:
            d_w = None
        elif d_w is None:
            d_w = torch.empty(n, dtype=torch.float32)
        else:
            d_w = _checked_out(d_w, (n,), torch.float32)
        fn = getattr(self.lib, f"swiglu_bwd_{self._suffix(h)}")
        self._run(fn, n, h.data_ptr(), w.data_ptr() if w is not None else None, d_act.data_ptr(), d_h.data_ptr(),
                  d_w.data_ptr() if d_w is not None else None, f)
        return d_h, d_w

    def fwd_rows(self, h: torch.Tensor, w: Optional[torch.Tensor], act: torch.Tensor):
        """``run(r0, r1, out_row=r0)`` computing rows [r0, r1) of :meth:`fwd` from ``h`` into ``act`` from
        its row ``out_row`` on (whole buffers, checked once here; ``act`` may be a scratch of fewer rows than
        ``h``): a per-expert call is then one C call, no slicing or checks per row block."""
        n, f = h.shape[0], h.shape[1] // 2
        h = _checked_out(h, (n, 2 * f), h.dtype)
        _checked_out(act, (act.shape[0], f), h.dtype)
        w = w.contiguous().to(h.dtype) if w is not None else None
        fn = getattr(self.lib, f"swiglu_fwd_{self._suffix(h)}")
        es, rows = h.element_size(), act.shape[0]
        hp, wp, ap = h.data_ptr(), (w.data_ptr() if w is not None else None), act.data_ptr()

        def run(r0: int, r1: int, out_row: Optional[int] = None, _keep=(h, w, act)) -> None:
            # _keep: the buffers outlive the pointers
            out_row = r0 if out_row is None else out_row
            if not (0 <= r0 <= r1 <= n and 0 <= out_row and out_row + r1 - r0 <= rows):
                raise IndexError(f"swiglu rows [{r0}, {r1}) -> {out_row}: outside {n} input / {rows} output rows")
            fn(hp + r0 * 2 * f * es, wp + r0 * es if wp else None, ap + out_row * f * es, 0, r1 - r0, f)
        return run

    def bwd_inplace_rows(self, h: torch.Tensor, w: Optional[torch.Tensor], d_act: torch.Tensor,
                         d_w: Optional[torch.Tensor]):
        """``run(r0, r1)``: rows [r0, r1) of :meth:`bwd`, in place: ``d_h`` over ``h``'s rows and the
        (weighted) activation over ``d_act``, whose rows [0, r1 - r0) hold the block's incoming gradient
        (a scratch of any number of rows); ``d_w`` (float32, when ``w`` is given) at rows [r0, r1)."""
        n, f = h.shape[0], h.shape[1] // 2
        h = _checked_out(h, (n, 2 * f), h.dtype)
        _checked_out(d_act, (d_act.shape[0], f), h.dtype)
        w = w.contiguous().to(h.dtype) if w is not None else None
        if w is not None:
            _checked_out(d_w, (n,), torch.float32)
        fn = getattr(self.lib, f"swiglu_bwd_inplace_{self._suffix(h)}")
        es, rows = h.element_size(), d_act.shape[0]
        hp, wp, ap = h.data_ptr(), (w.data_ptr() if w is not None else None), d_act.data_ptr()
        dwp = d_w.data_ptr() if w is not None else None

        def run(r0: int, r1: int, _keep=(h, w, d_act, d_w)) -> None:
            if not (0 <= r0 <= r1 <= n and r1 - r0 <= rows):
                raise IndexError(f"swiglu rows [{r0}, {r1}): outside {n} rows or a {rows}-row gradient")
            fn(hp + r0 * 2 * f * es, wp + r0 * es if wp else None, ap, dwp + r0 * 4 if dwp else None, 0, r1 - r0, f)
        return run

    def bwd_rows(self, h: torch.Tensor, w: Optional[torch.Tensor], d_act: torch.Tensor, d_h: torch.Tensor,
                 d_w: Optional[torch.Tensor]):
        """``run(r0, r1)`` computing rows [r0, r1) of :meth:`bwd` into ``d_h`` (and ``d_w``, float32, when
        ``w`` is given): whole buffers, checked once here.  The separate-buffer form: the MoE block runs
        :meth:`bwd_inplace_rows`; ``bench/activation_cache.py`` times the two against each other."""
        n, f = h.shape[0], h.shape[1] // 2
        h = _checked_out(h, (n, 2 * f), h.dtype)
        _checked_out(d_act, (n, f), h.dtype)
        _checked_out(d_h, (n, 2 * f), h.dtype)
        w = w.contiguous().to(h.dtype) if w is not None else None
        if w is not None:
            _checked_out(d_w, (n,), torch.float32)
        fn = getattr(self.lib, f"swiglu_bwd_{self._suffix(h)}")
        ptrs = (h.data_ptr(), w.data_ptr() if w is not None else None, d_act.data_ptr(), d_h.data_ptr(),
                d_w.data_ptr() if w is not None else None)

        def run(r0: int, r1: int, _keep=(h, w, d_act, d_h, d_w)) -> None:
            fn(*ptrs, r0, r1, f)
        return run


def _checked_out(t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    # The C code writes through the raw pointer: a wrong shape or a strided view would corrupt memory.
    if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"output must be a contiguous CPU {dtype} tensor of shape {shape}, got "
                         f"{t.dtype} {tuple(t.shape)} contiguous={t.is_contiguous()}")
    return t


class RowKernels:
    """``rows.c``: the dispatch's and the combine's row permutations (``desmoe.moe.permutation``)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.rows_gather.argtypes = [p, p, p, i64, i64]
        for name in ("rows_gather_sum_f32", "rows_gather_sum_bf16"):
            getattr(lib, name).argtypes = [p, p, p, i64, i64, i64]
        for name in ("rows_scatter_add_f32", "rows_scatter_add_bf16"):
            getattr(lib, name).argtypes = [p, p, p, p, i64, i64]
        lib.rows_zero_unseen.argtypes = [p, p, i64, i64]
        self.lib = lib

    @staticmethod
    def supports(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.dim() == 2

    def gather(self, src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``src[idx]`` for a contiguous [n, d] ``src`` and int64 ``idx`` of valid rows."""
        src, idx = src.contiguous(), idx.contiguous()
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise ValueError(f"row index must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
        _check_rows(idx, src.shape[0], allow_negative=False)
        out = src.new_empty((idx.shape[0], src.shape[1]))
        self.lib.rows_gather(src.data_ptr(), idx.data_ptr(), out.data_ptr(), idx.shape[0],
                             src.shape[1] * src.element_size())
        return out

    def gather_sum(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``out[t] = sum_j src[pos[j, t]]`` over ``pos`` [k, s] (int64; < 0 adds nothing), accumulated
        in fp32, in ``src``'s dtype."""
        src, pos = src.contiguous(), pos.contiguous()
        if pos.dtype != torch.int64 or pos.dim() != 2:
            raise ValueError(f"route positions must be a [k, tokens] int64 tensor, got {pos.dtype} {tuple(pos.shape)}")
        _check_rows(pos, src.shape[0], allow_negative=True)
        k, s = pos.shape
        out = src.new_empty((s, src.shape[1]))
        fn = self.lib.rows_gather_sum_f32 if src.dtype == torch.float32 else self.lib.rows_gather_sum_bf16
        fn(src.data_ptr(), pos.data_ptr(), out.data_ptr(), s, k, src.shape[1])
        return out

    def gather_rows(self, src: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor):
        """``run(r0, r1)``: ``dst[:r1 - r0] = src[idx[r0:r1]]`` (whole buffers, checked once here; ``dst`` a
        scratch of any number of rows): one C call per expert in the experts' token-order loop."""
        src, idx = _checked_out(src, tuple(src.shape), src.dtype), _checked_index(idx, src.shape[0])
        _checked_out(dst, (dst.shape[0], src.shape[1]), src.dtype)
        rb, n, rows = src.shape[1] * src.element_size(), idx.shape[0], dst.shape[0]
        sp, ip, dp = src.data_ptr(), idx.data_ptr(), dst.data_ptr()

        def run(r0: int, r1: int, _keep=(src, idx, dst)) -> None:
            if not (0 <= r0 <= r1 <= n and r1 - r0 <= rows):
                raise IndexError(f"gather rows [{r0}, {r1}): outside {n} indices or a {rows}-row scratch")
            self.lib.rows_gather(sp, ip + 8 * r0, dp, r1 - r0, rb)
        return run

    def scatter_add_rows(self, src: torch.Tensor, idx: torch.Tensor, acc: torch.Tensor):
        """``(run, finish)``: ``run(r0, r1)`` adds ``src[i]`` into ``acc[idx[r0 + i]]`` for i < r1 - r0, in row
        order; ``acc`` (float32) may start uninitialised: a token's first row is stored, and ``finish()``
        zeroes the tokens no row reached.  ``src`` float32 or bfloat16, a scratch of any number of rows."""
        s, d = acc.shape
        _checked_out(acc, (s, d), torch.float32)
        _checked_out(src, (src.shape[0], d), src.dtype)
        idx = _checked_index(idx, s)
        fn = self.lib.rows_scatter_add_f32 if src.dtype == torch.float32 else self.lib.rows_scatter_add_bf16
        seen = torch.zeros(s, dtype=torch.uint8)
        n, rows = idx.shape[0], src.shape[0]
        sp, ip, zp, ap = src.data_ptr(), idx.data_ptr(), seen.data_ptr(), acc.data_ptr()

        def run(r0: int, r1: int, _keep=(src, idx, seen, acc)) -> None:
            if not (0 <= r0 <= r1 <= n and r1 - r0 <= rows):
                raise IndexError(f"scatter rows [{r0}, {r1}): outside {n} indices or a {rows}-row source")
            fn(sp, ip + 8 * r0, zp, ap, r1 - r0, d)

        def finish(_keep=(seen, acc)) -> None:
            self.lib.rows_zero_unseen(zp, ap, s, d * 4)
        return run, finish


def _checked_index(idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    if idx.dtype != torch.int64 or idx.dim() != 1 or not idx.is_contiguous() or idx.device.type != "cpu":
        raise ValueError(f"row index must be a contiguous 1-D int64 CPU tensor, got {idx.dtype} {tuple(idx.shape)}")
    _check_rows(idx, num_rows, allow_negative=False)
    return idx


def _check_rows(idx: torch.Tensor, num_rows: int, allow_negative: bool) -> None:
    # The C loops read through the indices unchecked: an index past the end would read another buffer.
    if idx.numel() and (int(idx.max()) >= num_rows or (not allow_negative and int(idx.min()) < 0)):
        raise IndexError(f"row index out of range for {num_rows} rows (min {int(idx.min())}, max {int(idx.max())})")


def _load() -> None:
    global _lib, _rows, _loop, _tried
    if _tried:
        return
    _tried = True
    _lib = _rows = _loop = None
    if os.environ.get("DESMOE_FUSED_KERNELS", "1") == "0":
        return
    try:
        path = build()
        _lib = SwiGLUKernels(path)
        _rows = RowKernels(_lib.lib)
    except Exception as err:  # noqa: BLE001 - a missing compiler must not stop training
        warnings.warn(f"desmoe: fused CPU kernels unavailable ({err}); using torch ops")
        _lib = _rows = None
        return
    from desmoe.kernels.experts import ExpertLoop, torch_blas
    try:
        blas = torch_blas()
        _loop = ExpertLoop(_lib.lib, blas) if blas is not None else None
    except Exception as err:  # noqa: BLE001 - the Python loop computes the same
        warnings.warn(f"desmoe: the C expert loop is unavailable ({err}); using the Python loop")


def swiglu_cpu() -> Optional[SwiGLUKernels]:
    _load()
    return _lib


def rows_cpu() -> Optional[RowKernels]:
    _load()
    return _rows


def expert_loop_cpu():
    """``experts.ExpertLoop`` (the loop backend's expert loop in C, on torch's MKL), or None."""
    _load()
    return _loop if os.environ.get("DESMOE_EXPERT_LOOP", "1") != "0" else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_heap_kept: Optional[bool] = None


def release_freed_heap() -> bool:
    """Return the heap's free memory to the OS now (glibc's ``malloc_trim``).  For a process that runs
    independent jobs one after another (the study's runs): what ``keep_freed_heap`` kept for one run's
    steps is not the next run's working set.  Not glibc: nothing.  Returns whether memory was released."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return bool(trim(0))
    except (OSError, AttributeError):
        return False


def keep_freed_heap() -> bool:
    """Let glibc keep freed heap memory for reuse instead of returning it to the OS (once per process).

    torch's CPU allocator is plain malloc.  A training step frees and re-allocates the same buffers
    every step (weight gradients under ``zero_grad(set_to_none=True)``, activations); by default glibc
    unmaps blocks above an adaptive mmap threshold and trims a free heap top above 2x that, so each
    step faults and zero-fills the same pages again: 37 % of the MoE block's CPU time went to the
    kernel's page faults at the Qwen3 shape (1-thread ``perf``, ``docs/performance.md``).  Here
    blocks up to 32 MiB (glibc's ceiling) come from the heap and the heap top is trimmed only
    above 2 GiB free: the process keeps its peak heap, as a caching allocator would.  Skipped where
    the user chose an allocator (``LD_PRELOAD``) or glibc settings (``MALLOC_*_`` variables), off
    with ``DESMOE_KEEP_HEAP=0``; not glibc: nothing.  Returns whether the setting is in force."""
    global _heap_kept
    if _heap_kept is not None:
        return _heap_kept
    _heap_kept = False
    if os.environ.get("DESMOE_KEEP_HEAP", "1") == "0" or os.environ.get("LD_PRELOAD") \
            or any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int  # C ints: 2 GiB at most
        _heap_kept = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        pass
    return _heap_kept
