"""The grouped SwiGLU path (fused kernel or torch fallback) equals running each expert module."""
import pytest
import torch

from desmoe.moe import SwiGLUExpert
from desmoe.moe.grouped import grouped_swiglu
from kernelcheck import need, need_compiler
from tolerance import assert_close


@pytest.mark.parametrize("fused", ["1", "py", "0"])  # py: the C kernels in the Python loop (not experts.c's)
@pytest.mark.parametrize("with_weights", [True, False])
def test_grouped_matches_modules(monkeypatch, fused, with_weights):
    import desmoe.kernels as kernels

    if fused == "py":
        monkeypatch.setenv("DESMOE_EXPERT_LOOP", "0")
        fused = "1"
    monkeypatch.setenv("DESMOE_FUSED_KERNELS", fused)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_loop", None)
    monkeypatch.setattr(kernels, "_rows", None)
    if fused == "1":
        need(kernels.swiglu_cpu())
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(SwiGLUExpert(16, 24) for _ in range(3))
    counts = [5, 0, 9]  # an expert with no rows must still work
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.rand(sum(counts), requires_grad=True) if with_weights else None
    upstream = torch.randn(sum(counts), 16)

    y = grouped_swiglu(x, counts, experts, w)
    (y * upstream).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in experts.parameters()] + ([w.grad.clone()] if w is not None else [])
    for t in [x, *experts.parameters()] + ([w] if w is not None else []):
        t.grad = None

    parts = x.split(counts)
    ref = torch.cat([e(p) for e, p in zip(experts, parts)])
    if w is not None:
        ref = ref * w.unsqueeze(1)
    (ref * upstream).sum().backward()
    want = [x.grad] + [p.grad for p in experts.parameters()] + ([w.grad] if w is not None else [])
    fwd = 16 + 24  # gate/up over d, down over the expert width
    assert_close(y, ref, terms=fwd)
    for g, r in zip(got, want):  # the backward repeats the chain and sums weight gradients over <= 14 rows
        assert_close(g, r, terms=2 * fwd + max(counts))


def test_bf16_kernel_matches_fp32_math():
    from desmoe.kernels import swiglu_cpu

    kernel = need(swiglu_cpu())
    torch.manual_seed(1)
    h = torch.randn(37, 2 * 300)  # odd sizes: not a multiple of any vector width or chunk
    w = torch.rand(37)
    d_act = torch.randn(37, 300)
    ref_act = torch.nn.functional.silu(h[:, :300]) * h[:, 300:] * w[:, None]
    act = kernel.fwd(h.bfloat16(), w.bfloat16()).float()
    # inputs gate, up, w rounded to bf16, the product rounded once more; fp32 arithmetic in between
    assert_close(act, ref_act, terms=1, roundings=4, stored=torch.bfloat16)
    d_h32, d_w32 = kernel.bwd(h, w, d_act)
    d_h16, d_w16 = kernel.bwd(h.bfloat16(), w.bfloat16(), d_act.bfloat16())
    assert d_h16.dtype == torch.bfloat16 and d_w16.dtype == torch.float32
    # d_h: a product of gate, up, w, d_act (each rounded) and the output rounding
    assert_close(d_h16.float(), d_h32, terms=1, roundings=5, stored=torch.bfloat16)
    # d_w: an fp32 sum over 300 products of rounded inputs; its terms may cancel, so the scale is sum |terms|
    terms_abs = (torch.nn.functional.silu(h[:, :300]) * h[:, 300:] * d_act).abs().sum(1).max().item()
    assert_close(d_w16, d_w32, terms=300, roundings=4, stored=torch.bfloat16, scale=terms_abs)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_loop_backend_keeps_no_activation_and_refuses_a_second_backward(monkeypatch, fused):
    """The loop backend saves the inputs and pre-activations only ([N, d + 2f] per layer, not [N, d + 3f]),
    and its backward writes the pre-activations' gradient over them: a second backward through one forward
    is refused in one line, not computed from overwritten values."""
    import desmoe.kernels as kernels

    monkeypatch.setenv("DESMOE_FUSED_KERNELS", fused)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_loop", None)
    monkeypatch.setattr(kernels, "_rows", None)
    torch.manual_seed(0)
    d, f, counts = 16, 24, [5, 0, 9]
    experts = torch.nn.ModuleList(SwiGLUExpert(d, f) for _ in range(3))
    x = torch.randn(sum(counts), d, requires_grad=True)
    w = torch.rand(sum(counts), requires_grad=True)
    params = {p.data_ptr() for p in experts.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = grouped_swiglu(x, counts, experts, w, backend="loop")
    activations = sum(t.numel() for t in saved if t.data_ptr() not in params)
    assert activations == sum(counts) * (d + 2 * f + 1)  # x, gate | up, the route weights
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward") as err:
        y.sum().backward()
    assert "\n" not in str(err.value)


def _avx512() -> bool:
    try:
        return any(line.startswith("flags") and " avx512f" in line for line in open("/proc/cpuinfo"))
    except OSError:
        return False


@pytest.fixture(params=["native", "no-avx512"])
def swiglu_kernel(request, tmp_path_factory, monkeypatch):
    """The machine's kernels, and on an AVX-512 machine also the plain C loops (built without AVX-512) that
    other CPUs run."""
    import desmoe.kernels as kernels

    if request.param == "native":
        return need(kernels.swiglu_cpu())
    if not _avx512():
        pytest.skip("no AVX-512 here: the native build is already the plain C loops")
    need_compiler()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("kernels")))
    return kernels.SwiGLUKernels(kernels.build(extra_flags=("-mno-avx512f",)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gate_far_below_zero_is_not_nan(dtype, swiglu_kernel):
    """expf(-g) overflows below g = -88; under -ffast-math 1 / (1 + inf) came out NaN (silu(-100) = NaN, torch:
    -0).  Every kernel entry point on gates over [-1e4, 1e4]: finite, and torch's values within rounding."""
    kernel = swiglu_kernel
    n, f = 3, 64
    h = torch.randn(n, 2 * f, generator=torch.Generator().manual_seed(4))
    h[:, :f] = torch.linspace(-1e4, 1e4, f) * torch.tensor([[1.0], [0.01], [0.001]])
    h, w, d_act = h.to(dtype), torch.rand(n).to(dtype), torch.randn(n, f).to(dtype)
    gate, up, d, wf = h[:, :f].float(), h[:, f:].float(), d_act.float(), w.float()[:, None]
    act_ref = torch.nn.functional.silu(gate) * up * wf
    sig = torch.sigmoid(gate)
    d_h_ref = torch.cat([d * wf * up * sig * (1 + gate * (1 - sig)), d * wf * gate * sig], 1)
    d_h, d_w = kernel.bwd(h, w, d_act)
    buf, scratch, d_w2 = h.clone(), d_act.clone(), torch.empty(n)
    kernel.bwd_inplace_rows(buf, w, scratch, d_w2)(0, n)
    stored = dict(stored=torch.bfloat16, roundings=2) if dtype == torch.bfloat16 else {}
    for got, want in ((kernel.fwd(h, w), act_ref), (scratch, act_ref), (d_h, d_h_ref), (buf, d_h_ref)):
        assert torch.isfinite(got).all()
        # the kernel's vector expf and reciprocal: a few ulps of the activation's magnitude, per row
        assert_close(got.float(), want, terms=8, **stored)


def test_kernel_activation_matches_torch_on_inf_and_nan(swiglu_kernel):
    """silu(+inf) = inf and silu(nan) = nan, as torch: the vector exp's range reduction (x - n ln 2) must not
    turn an infinite gate into inf - inf."""
    kernel = swiglu_kernel
    gate = torch.tensor([[float("inf"), float("nan"), 1e30, -1e30, 0.0, 3.0]])
    h = torch.cat([gate, torch.ones_like(gate)], 1)
    act = kernel.fwd(h, None)
    want = torch.nn.functional.silu(gate)
    finite = torch.isfinite(want)
    assert torch.equal(act[~finite].isnan(), want[~finite].isnan()) and (act[want == float("inf")] == float("inf")).all()
    assert_close(act[finite], want[finite], terms=8)
