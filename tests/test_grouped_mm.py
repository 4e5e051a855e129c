"""The grouped_mm backend of grouped_swiglu (what CUDA runs) computes what the loop backend computes.

torch runs ``torch._grouped_mm`` on CPU too, so its math -- offsets, the stacked weights, the
2-D x 2-D weight-gradient GEMMs, the weight-gradient row mask, frozen experts -- is checked here;
only the kernel differs on a GPU (``make gpu-check`` compares the two backends there)."""
import pytest
import torch

from desmoe.moe import SwiGLUExpert
from desmoe.moe.grouped import grouped_mm_supported, grouped_swiglu
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


def test_cpu_row_tiles_match_one_tile(monkeypatch):
    """The loop backend's CPU row tiles (GEMM -> activation -> GEMM per tile) change nothing but the order."""
    import desmoe.moe.grouped as grouped

    torch.manual_seed(2)
    experts = torch.nn.ModuleList(SwiGLUExpert(D, F) for _ in range(3))
    counts = [41, 0, 70]  # several tiles each, the last one partial
    n = sum(counts)
    x = torch.randn(n, D, requires_grad=True)
    w = torch.rand(n, requires_grad=True)
    keep = torch.rand(n) > 0.3
    upstream = torch.randn(n, D)
    monkeypatch.setattr(grouped, "TILE_BYTES", 0)
    y_one, g_one = run("loop", experts, x, counts, w, keep, upstream)
    monkeypatch.setattr(grouped, "TILE_BYTES", 16 * 2 * F * 4)  # 16 rows per tile
    y_tiled, g_tiled = run("loop", experts, x, counts, w, keep, upstream)
    # the same arithmetic per row; a GEMM library may still pick another kernel for fewer rows
    assert_close(y_tiled, y_one, terms=D + F)
    for a, b in zip(g_tiled, g_one):
        assert_close(a, b, terms=2 * (D + F) + max(counts))
