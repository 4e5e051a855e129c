"""grouped_mm backend: an expert that received no rows gets an exact zero weight gradient whatever the
kernel leaves in its slice.  A 2-D x 2-D ``torch._grouped_mm`` (the weight-gradient GEMMs) need not write
an empty group's output: CUDA kernels were seen returning garbage there (pytorch/pytorch#172439, on
Blackwell), which torch's CPU loop never does.  So the test runs the real kernel on the CPU and then
fills the slices the kernel was free to leave unwritten with NaN, as such a device may."""
import pytest
import torch

import desmoe.moe.grouped as grouped
from desmoe.moe import SwiGLUExpert
from desmoe.moe.grouped import grouped_swiglu

D, F = 16, 24


def _unwritten_empty_groups(a, b, offs):
    out = torch._grouped_mm(a, b, offs=offs)
    if a.dim() == 2 and b.dim() == 2:  # [E, m, n]: group e's slice is empty where offs does not advance
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        out[sizes == 0] = float("nan")
    return out


@pytest.mark.parametrize("token_mode", [False, True])
def test_empty_expert_weight_gradient_is_zero(monkeypatch, token_mode):
    monkeypatch.setattr(grouped, "_gmm", _unwritten_empty_groups)
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(SwiGLUExpert(D, F) for _ in range(4)).bfloat16()
    counts = torch.tensor([5, 0, 7, 0])
    n = int(counts.sum())
    x = torch.randn(n // 2 if token_mode else n, D, dtype=torch.bfloat16, requires_grad=True)
    token_of_row = torch.randperm(n) % (n // 2) if token_mode else None
    y = grouped_swiglu(x, counts, experts, backend="grouped_mm", token_of_row=token_of_row)
    y.float().square().sum().backward()
    for e in (1, 3):
        for p in experts[e].parameters():
            assert p.grad is not None and float(p.grad.abs().max()) == 0.0, f"expert {e} has no rows"
    for e in (0, 2):  # the busy experts' gradients are real numbers
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in experts[e].parameters())
