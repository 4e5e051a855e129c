"""The grouped_mm backend of grouped_swiglu (what CUDA runs) computes what the loop backend computes.

torch runs ``torch._grouped_mm`` on CPU too, so its math -- offsets, the stacked weights, the
2-D x 2-D weight-gradient GEMMs, the weight-gradient row mask, frozen experts -- is checked here;
only the kernel differs on a GPU (``make gpu-check`` compares the two backends there)."""
from pathlib import Path

import pytest
import torch

from desmoe.moe import SwiGLUExpert
from desmoe.moe.grouped import grouped_mm_supported, grouped_swiglu
from kernelcheck import need
from tolerance import assert_close

D, F = 16, 24


def run(backend, experts, x, counts, w, keep, upstream):
    for t in [x, w, *experts.parameters()]:
        if t is not None:
            t.grad = None
    y = grouped_swiglu(x, counts, experts, w, keep, backend=backend)
    (y.float() * upstream).sum().backward()
    grads = [x.grad] + [p.grad for p in experts.parameters()] + ([w.grad] if w is not None else [])
    return y.detach(), [g.clone() if g is not None else None for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_mm_matches_loop(dtype, with_weights, masked):
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(SwiGLUExpert(D, F) for _ in range(4)).to(dtype)
    experts[2].requires_grad_(False)  # a frozen expert gets no weight gradient from either backend
    counts = [5, 0, 7, 9]  # an expert with no rows must still work
    n = sum(counts)
    x = torch.randn(n, D, dtype=dtype, requires_grad=True)
    w = torch.rand(n, dtype=dtype, requires_grad=True) if with_weights else None
    keep = torch.rand(n) > 0.4 if masked else None
    upstream = torch.randn(n, D)
    y_loop, g_loop = run("loop", experts, x, counts, w, keep, upstream)
    y_gmm, g_gmm = run("grouped_mm", experts, x, torch.tensor(counts), w, keep, upstream)
    assert [g is None for g in g_loop] == [g is None for g in g_gmm]
    assert g_gmm[1 + 4] is None and g_gmm[1 + 5] is None  # expert 2 frozen
    stored = {"roundings": 3, "stored": torch.bfloat16} if dtype == torch.bfloat16 else {}
    fwd = D + F
    assert_close(y_gmm.float(), y_loop.float(), terms=fwd, **stored)
    for a, b in zip(g_gmm, g_loop):
        if a is not None:  # backward repeats the chain and sums weight gradients over <= 9 rows
            assert_close(a.float(), b.float(), terms=2 * fwd + max(counts), **stored)
    if masked:  # an expert whose rows are all masked gets an exact zero weight gradient
        all_masked = torch.zeros(n, dtype=torch.bool)
        _, g = run("grouped_mm", experts, x, torch.tensor(counts), w, all_masked, upstream)
        assert all(float(t.abs().max()) == 0.0 for t in g[1:9] if t is not None)


def test_auto_picks_loop_on_cpu():
    experts = torch.nn.ModuleList(SwiGLUExpert(D, F) for _ in range(2)).bfloat16()
    assert not grouped_mm_supported(torch.randn(3, D).bfloat16(), experts)


def test_unknown_backend_is_refused():
    experts = torch.nn.ModuleList([SwiGLUExpert(D, F)])
    with pytest.raises(ValueError, match="backend"):
        grouped_swiglu(torch.randn(2, D), [2], experts, backend="cutlass")


def test_kernel_row_blocks_write_only_their_rows():
    """The loop backend's per-expert activation calls (one C call per row block of the whole buffers)
    equal the whole-buffer call, and a block writes its own rows only."""
    from desmoe.kernels import swiglu_cpu

    kernel = need(swiglu_cpu())
    torch.manual_seed(2)
    n, f = 23, 40
    h, w, d_act = torch.randn(n, 2 * f), torch.rand(n), torch.randn(n, f)
    act_ref = kernel.fwd(h, w)
    d_h_ref, d_w_ref = kernel.bwd(h, w, d_act)
    act = torch.full((n, f), float("nan"))
    d_h, d_w = torch.full((n, 2 * f), float("nan")), torch.full((n,), float("nan"))
    fwd, bwd = kernel.fwd_rows(h, w, act), kernel.bwd_rows(h, w, d_act, d_h, d_w)
    fwd(5, 12), bwd(5, 12)
    assert act[:5].isnan().all() and act[12:].isnan().all() and d_h[12:].isnan().all() and d_w[:5].isnan().all()
    fwd(0, 5), fwd(12, n), bwd(0, 5), bwd(12, n)
    # the same C loop over the same rows: bit-identical
    assert torch.equal(act, act_ref) and torch.equal(d_h, d_h_ref) and torch.equal(d_w, d_w_ref)
    with pytest.raises(ValueError, match="contiguous"):  # the C code writes through raw pointers
        kernel.fwd_rows(h, w, torch.empty(f, n).t())
    # into a scratch of one block's rows (the loop backend's forward): the same values, no row outside it
    scratch = torch.full((7, f), float("nan"))
    kernel.fwd_rows(h, w, scratch)(5, 12, 0)
    assert torch.equal(scratch, act_ref[5:12])
    with pytest.raises(IndexError, match="outside"):
        kernel.fwd_rows(h, w, scratch)(5, 13, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_inplace_backward(dtype):
    """The loop backend's backward kernel, in place: d_h over h's rows [r0, r1) (no other row touched) and
    the forward's weighted activation over the block's d_act scratch; d_w at rows [r0, r1)."""
    from desmoe.kernels import swiglu_cpu

    kernel = need(swiglu_cpu())
    torch.manual_seed(3)
    n, f = 23, 40
    h, w, d_act = (torch.randn(n, 2 * f) * 3).to(dtype), torch.rand(n).to(dtype), torch.randn(n, f).to(dtype)
    act_ref = kernel.fwd(h, w).float()
    d_h_ref, d_w_ref = kernel.bwd(h, w, d_act)
    buf, d_w = h.clone(), torch.full((n,), float("nan"))
    scratch = torch.full((9, f), float("nan")).to(dtype)
    scratch[:7] = d_act[5:12]
    kernel.bwd_inplace_rows(buf, w, scratch, d_w)(5, 12)
    assert torch.equal(buf[:5], h[:5]) and torch.equal(buf[12:], h[12:]) and scratch[7:].isnan().all()
    assert d_w[:5].isnan().all() and d_w[12:].isnan().all()
    # the same arithmetic as the separate-buffer kernel; the activation is the forward's expression, which
    # the compiler may associate differently (one rounding of the activation, one of the storage dtype)
    stored = dict(stored=torch.bfloat16, roundings=1) if dtype == torch.bfloat16 else {}
    assert_close(buf[5:12].float(), d_h_ref[5:12].float(), terms=1, **stored)
    assert_close(scratch[:7].float(), act_ref[5:12], terms=2, **stored)
    terms_abs = (act_ref / w.float()[:, None] * d_act.float()).abs().sum(1).max().item()
    assert_close(d_w[5:12], d_w_ref[5:12], terms=f, scale=terms_abs)
    with pytest.raises(IndexError, match="outside"):
        kernel.bwd_inplace_rows(buf, w, scratch, d_w)(0, 10)  # 10 rows, a 9-row gradient


def test_keep_freed_heap(monkeypatch):
    """Building an MoE block sets glibc to keep freed memory (no page faults per step); opt-out honoured."""
    import platform

    import desmoe.kernels as kernels

    monkeypatch.setattr(kernels, "_heap_kept", None)
    monkeypatch.setenv("DESMOE_KEEP_HEAP", "0")
    assert kernels.keep_freed_heap() is False
    monkeypatch.setattr(kernels, "_heap_kept", None)
    monkeypatch.delenv("DESMOE_KEEP_HEAP")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert kernels.keep_freed_heap() is glibc


def test_release_freed_heap_hands_kept_memory_back():
    """A process running runs one after another returns the heap one run kept (the study's launches)."""
    import platform
    import subprocess
    import sys

    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc only")
    code = (  # a fresh process: the heap setting is once per process
        "import torch\n"
        "from desmoe.kernels import keep_freed_heap, release_freed_heap\n"
        "def rss(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10\n"
        "assert keep_freed_heap()\n"
        "xs = [torch.ones(1 << 18) for _ in range(512)]\n"  # 512 MiB in 1 MiB blocks, under the 32 MiB mmap threshold
        "before = rss(); del xs; kept = rss(); release_freed_heap(); print(before, kept, rss())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    before, kept, after = map(int, out.stdout.split())
    assert kept > before - 64  # kept: freed blocks stay in the process
    assert after < before - 400  # handed back: at least 400 of the 512 MiB
