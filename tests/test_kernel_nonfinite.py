"""A NaN or an infinity must surface through the fused CPU kernels exactly where torch's math puts one: they
are built with -ffast-math (-ffinite-math-only lets the compiler assume neither exists), and a NaN loss or
gradient that vanished inside a kernel would train on silently (tests/test_run_faults.py stops on one).
Every entry point, forward and backward, the C expert loop too, against torch on the same inputs."""
from __future__ import annotations

import pytest
import torch

import desmoe.kernels as kernels
from desmoe.moe import SwiGLUExpert
from desmoe.moe.grouped import grouped_swiglu
from kernelcheck import need, need_compiler

NAN, INF = float("nan"), float("inf")


def _bad(t: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(t.float())


def _inputs(dtype):
    n, f = 4, 20  # a row's tail is not a whole vector
    gen = torch.Generator().manual_seed(7)
    h, d_act, w = torch.randn(n, 2 * f, generator=gen), torch.randn(n, f, generator=gen), torch.rand(n, generator=gen)
    h[0, 3], h[1, 5], h[2, 7], h[3, f + 2] = NAN, INF, -INF, NAN  # gate NaN / +inf / -inf, an up NaN
    d_act[1, 11] = NAN  # a NaN gradient arriving in a row whose gate is otherwise finite there
    return h.to(dtype), w.to(dtype), d_act.to(dtype)


def _torch_ref(h, w, d_act):
    f = h.shape[1] // 2
    g, u = h[:, :f].float().requires_grad_(), h[:, f:].float().requires_grad_()
    wf = w.float().requires_grad_()
    act = torch.nn.functional.silu(g) * u * wf[:, None]
    (act * d_act.float()).sum().backward()
    return act.detach(), torch.cat([g.grad, u.grad], 1), wf.grad


@pytest.fixture(params=["native", "no-avx512"])
def swiglu_kernel(request, tmp_path, monkeypatch):
    """The machine's build and, on an x86 machine, the plain C loops an AVX2-only CPU runs (e.g. AMD Zen 2/3),
    whose expf is glibc's vector one rather than the inlined AVX-512 code."""
    if request.param == "native":
        return need(kernels.swiglu_cpu())
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("not x86: the native build is already the plain C loops")
    need_compiler()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return kernels.SwiGLUKernels(kernels.build(extra_flags=("-mno-avx512f",)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernels_keep_every_nan_and_inf_torch_has(dtype, swiglu_kernel):
    kernel = swiglu_kernel
    h, w, d_act = _inputs(dtype)
    act_ref, d_h_ref, d_w_ref = _torch_ref(h, w, d_act)
    d_h, d_w = kernel.bwd(h, w, d_act)
    buf, scratch, d_w2 = h.clone(), d_act.clone(), torch.empty(h.shape[0])
    kernel.bwd_inplace_rows(buf, w, scratch, d_w2)(0, h.shape[0])
    for name, got, want in (("fwd", kernel.fwd(h, w), act_ref), ("in-place activation", scratch, act_ref),
                            ("d_h", d_h, d_h_ref), ("in-place d_h", buf, d_h_ref), ("d_w", d_w, d_w_ref),
                            ("in-place d_w", d_w2, d_w_ref)):
        # the same elements non-finite (inf where torch has NaN is fine: silu(-inf) is -inf * 0 in torch)
        assert torch.equal(_bad(got), _bad(want)), f"{name}: non-finite at {_bad(got).nonzero().tolist()}, " \
                                                   f"torch at {_bad(want).nonzero().tolist()}"
        assert torch.equal(got.float().isnan() & ~want.isnan(), torch.zeros_like(_bad(got))), name


def test_row_kernels_keep_nan_and_inf():
    rows = need(kernels.rows_cpu(), "the CPU row kernels")
    src = torch.randn(6, 19)
    src[2, 3], src[4, 1] = NAN, INF
    pos = torch.tensor([[0, 2, -1], [4, 1, 5]])
    want = torch.zeros(3, 19)
    for j in range(2):
        for t in range(3):
            if pos[j, t] >= 0:
                want[t] += src[pos[j, t]]
    got = rows.gather_sum(src, pos)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    acc = torch.empty(3, 19)
    run, finish = rows.scatter_add_rows(src, torch.tensor([0, 2, 1, 0, 1, 2]), acc)
    run(0, 6), finish()
    want = torch.zeros(3, 19).index_add_(0, torch.tensor([0, 2, 1, 0, 1, 2]), src)
    assert torch.equal(acc.isnan(), want.isnan()) and torch.equal(acc.isinf(), want.isinf())


def test_expert_loop_keeps_a_nan_token_and_its_gradients():
    """A NaN in one token's input reaches its output, its input gradient and every weight gradient of the
    experts it was routed to, as in the Python loop (the C loop's GEMMs are MKL's, compiled elsewhere)."""
    need(kernels.swiglu_cpu())
    torch.manual_seed(5)
    experts = torch.nn.ModuleList([SwiGLUExpert(8, 12) for _ in range(3)])
    counts = [3, 0, 4]
    x = torch.randn(7, 8)
    x[4, 2] = NAN  # a row of expert 2
    out = {}
    for loop in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DESMOE_EXPERT_LOOP", loop)
            xx = x.clone().requires_grad_()
            y = grouped_swiglu(xx, counts, experts, backend="loop")
            experts.zero_grad(set_to_none=True)
            y.sum().backward()
            out[loop] = (y.detach(), xx.grad, [p.grad.clone() if p.grad is not None else None
                                               for p in experts.parameters()])
    (y1, gx1, gw1), (y0, gx0, gw0) = out["1"], out["0"]
    assert torch.equal(_bad(y1), _bad(y0)) and _bad(y1)[4].all() and not _bad(y1)[:4].any()
    assert torch.equal(_bad(gx1), _bad(gx0)) and _bad(gx1)[4].any()
    for a, b in zip(gw1, gw0):
        assert (a is None) == (b is None) and (a is None or torch.equal(_bad(a), _bad(b)))
    assert _bad(gw1[-1]).any()  # expert 2's down projection saw the NaN
