"""The experts' loop in token mode (desmoe.moe.grouped, ``token_of_row``): each expert's rows gathered from
token order and its outputs summed back into it inside the loop equal the dispatch's whole-batch gather,
the experts on expert-ordered rows, and the combine (desmoe.moe.permutation) -- forward and every gradient,
with capacity drops, weight-gradient masks, empty experts, fp32 and bf16, the C expert loop, the Python loop on
the C kernels, and torch ops."""
import pytest
import torch

from desmoe.moe import SwiGLUExpert
from desmoe.moe.grouped import grouped_swiglu
from desmoe.moe.permutation import permute, unpermute
from test_permutation import _kernels, _routes
from kernelcheck import need
from tolerance import assert_close


def _run(x, plan, counts, experts, w, keep, token_mode: bool, upstream, backend="loop"):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    if token_mode:
        out = grouped_swiglu(x, counts, experts, w, keep, backend=backend, token_of_row=plan.token_of_route)
    else:
        out = unpermute(grouped_swiglu(permute(x, plan), counts, experts, w, keep, backend=backend), plan, x.dtype)
    (out.float() * upstream).sum().backward()
    grads = [x.grad, w.grad] + [p.grad.clone() for p in experts.parameters()]
    for p in experts.parameters():
        p.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("backend,fused", [("loop", "1"), ("loop", "py"), ("loop", "0"), ("grouped_mm", "1")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,capacity,masked", [(1, None, False), (2, None, False), (2, None, True), (3, None, False),
                                               (2, 3, True), (4, 2, False)])
def test_token_mode_equals_the_whole_batch_passes(monkeypatch, backend, fused, dtype, k, capacity, masked):
    if fused == "py":  # the C kernels in the Python loop (fp32 runs experts.c's loop otherwise)
        monkeypatch.setenv("DESMOE_EXPERT_LOOP", "0")
        fused = "1"
    _kernels(monkeypatch, fused)
    # odd widths for the loop (no vector-width multiple); the grouped GEMM takes 16-byte aligned rows only
    num_tokens, d, f, num_experts = 13, 37 if backend == "loop" else 40, 24, 6
    plan, token_of_route, pos, order = _routes(num_tokens, k, num_experts, capacity, seed=k)
    route_expert = _expert_ids(num_tokens, k, num_experts, seed=k).t().reshape(-1)
    counts = torch.bincount(route_expert[order], minlength=num_experts).tolist()
    torch.manual_seed(0)
    if capacity is not None:
        assert (pos < 0).all(0).any(), "some token must lose every route for this case to test it"
    experts = torch.nn.ModuleList(SwiGLUExpert(d, f) for _ in range(num_experts)).to(dtype)
    x = torch.randn(num_tokens, d).to(dtype)
    w = torch.rand(order.numel()).to(dtype)
    keep = (torch.rand(order.numel()) > 0.4) if masked else None
    upstream = torch.randn(num_tokens, d)

    out, grads = _run(x, plan, counts, experts, w, keep, True, upstream, backend)
    ref, ref_grads = _run(x, plan, counts, experts, w, keep, False, upstream, backend)
    assert out.dtype == dtype and out.shape == (num_tokens, d)
    # Both accumulate in fp32 (GEMMs, activation, sums); a bf16 run stores h, the activation, each expert's
    # output and the result in bf16 (4 roundings), and its backward d_act, d_h, the row gradients and the
    # weight gradients (2 more on any path).
    chain = d + f + k  # gate/up over d, down over f, the k-way sum
    assert_close(out, ref, terms=chain, dtype=torch.float32, roundings=4, stored=dtype)
    for got, want in zip(grads, ref_grads):  # the backward repeats the chain; weight sums over <= S k rows
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, terms=2 * chain + num_tokens * k, dtype=torch.float32, roundings=6, stored=dtype)
    dropped = (pos < 0).all(0)  # tokens every route of which was dropped: exactly zero, not stale memory
    assert (out[dropped] == 0).all() and (grads[0][dropped] == 0).all()


def _expert_ids(num_tokens, k, num_experts, seed):
    gen = torch.Generator().manual_seed(seed)  # the draw _routes makes
    return torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_tokens)])


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_token_mode_keeps_x_once(monkeypatch, backend):
    """The forward keeps the token-order input (which a linear router keeps too), not its k gathered copies."""
    _kernels(monkeypatch, "1")
    num_tokens, d, f, k = 16, 8, 12, 3
    plan, _, _, order = _routes(num_tokens, k, 4, None, seed=1)
    counts = torch.bincount(_expert_ids(num_tokens, k, 4, seed=1).t().reshape(-1)[order], minlength=4).tolist()
    experts = torch.nn.ModuleList(SwiGLUExpert(d, f) for _ in range(4))
    x = torch.randn(num_tokens, d, requires_grad=True)
    params = {p.data_ptr() for p in experts.parameters()}
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        grouped_swiglu(x, counts, experts, backend=backend, token_of_row=plan.token_of_route)
    floats = sum(t.numel() for t in saved if t.data_ptr() not in params and t.is_floating_point())
    act = num_tokens * k * f if backend == "grouped_mm" else 0  # that backend keeps the activation too
    assert floats == num_tokens * d + num_tokens * k * 2 * f + act  # x once, gate | up per row


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_token_of_row_must_match_the_rows(backend):
    experts = torch.nn.ModuleList(SwiGLUExpert(8, 16) for _ in range(2))
    with pytest.raises(ValueError, match=r"one entry per row \(4\)"):
        grouped_swiglu(torch.randn(4, 8), [2, 2], experts, backend=backend, token_of_row=torch.arange(3))


def test_row_scatter_kernel_stores_first_adds_later_and_zeroes_the_rest():
    from desmoe.kernels import rows_cpu

    rows = need(rows_cpu(), "the CPU row kernels")
    rows_in = torch.arange(12.0).view(4, 3)
    src = torch.empty(2, 3)  # a two-row scratch: run(r0, r1) reads its first r1 - r0 rows
    acc = torch.full((3, 3), float("nan"))  # uninitialised memory: nothing may read it
    run, finish = rows.scatter_add_rows(src, torch.tensor([2, 0, 2, 2]), acc)
    src.copy_(rows_in[:2]), run(0, 2)
    src.copy_(rows_in[2:]), run(2, 4)
    finish()
    assert acc.tolist() == [[3.0, 4.0, 5.0], [0.0] * 3, [0 + 6 + 9.0, 1 + 7 + 10.0, 2 + 8 + 11.0]]
    bf = rows.scatter_add_rows(rows_in.bfloat16(), torch.tensor([1, 1, 0, 2]), acc)
    bf[0](0, 4), bf[1]()
    assert acc.tolist() == [[6.0, 7.0, 8.0], [3.0, 5.0, 7.0], [9.0, 10.0, 11.0]]
    with pytest.raises(IndexError, match="out of range for 3 rows"):
        rows.scatter_add_rows(rows_in, torch.tensor([0, 3, 1, 1]), acc)
    with pytest.raises(IndexError, match="2-row source"):
        run(0, 3)
    gather = rows.gather_rows(rows_in, torch.tensor([3, 1, 1]), torch.empty(2, 3))
    gather(1, 3)
    with pytest.raises(IndexError, match="2-row scratch"):
        gather(0, 3)
    with pytest.raises(IndexError, match="2-row scratch"):
        gather(0, 3)
    with pytest.raises(ValueError, match="int64"):
        rows.gather_rows(rows_in, torch.tensor([0], dtype=torch.int32), torch.empty(1, 3))


def test_token_mode_takes_a_strided_input(monkeypatch):
    """x whose rows are not contiguous in memory (a view) runs as its contiguous copy would."""
    _kernels(monkeypatch, "1")
    torch.manual_seed(3)
    experts = torch.nn.ModuleList(SwiGLUExpert(8, 12) for _ in range(2))
    base = torch.randn(8, 6)
    x = base.t().detach().requires_grad_(True)  # [6, 8], column-major
    token_of_row = torch.tensor([0, 3, 5, 1, 2, 4, 5, 0])
    out = grouped_swiglu(x, [3, 5], experts, token_of_row=token_of_row)
    out.sum().backward()
    x2 = x.detach().contiguous().requires_grad_(True)
    ref = grouped_swiglu(x2, [3, 5], experts, token_of_row=token_of_row)
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, x2.grad)
