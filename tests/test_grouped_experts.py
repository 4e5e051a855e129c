"""The grouped SwiGLU path (fused kernel or torch fallback) equals running each expert module."""
import pytest
import torch

from desmoe.moe import SwiGLUExpert
from desmoe.moe.grouped import grouped_swiglu


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("with_weights", [True, False])
def test_grouped_matches_modules(monkeypatch, fused, with_weights):
    import desmoe.kernels as kernels

    monkeypatch.setenv("DESMOE_FUSED_KERNELS", fused)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    if fused == "1":
        assert kernels.swiglu_cpu() is not None, "the fused CPU kernel should build on this machine"
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
    assert (y - ref).abs().max().item() < 1e-5
    for g, r in zip(got, want):
        assert (g - r).abs().max().item() < 1e-4


def test_bf16_kernel_matches_fp32_math():
    from desmoe.kernels import swiglu_cpu

    kernel = swiglu_cpu()
    assert kernel is not None
    torch.manual_seed(1)
    h = torch.randn(37, 2 * 300)  # odd sizes: not a multiple of any vector width or chunk
    w = torch.rand(37)
    d_act = torch.randn(37, 300)
    ref_act = torch.nn.functional.silu(h[:, :300]) * h[:, 300:] * w[:, None]
    act = kernel.fwd(h.bfloat16(), w.bfloat16()).float()
    assert (act - ref_act).abs().max().item() < 0.05 * ref_act.abs().max().item()
    d_h32, d_w32 = kernel.bwd(h, w, d_act)
    d_h16, d_w16 = kernel.bwd(h.bfloat16(), w.bfloat16(), d_act.bfloat16())
    assert d_h16.dtype == torch.bfloat16 and d_w16.dtype == torch.float32
    assert (d_h16.float() - d_h32).abs().max().item() < 0.05 * d_h32.abs().max().item()
    assert (d_w16 - d_w32).abs().max().item() < 0.05 * d_w32.abs().max().item()
