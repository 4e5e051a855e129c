"""The dispatch's row permutation and the combine's k-way sum (desmoe.moe.permutation): the C kernels and
the torch ops compute the same function and its gradient, with capacity drops, in fp32 and bf16."""
import pytest
import torch

from desmoe.moe.permutation import RoutePlan, permute, unpermute
from kernelcheck import need
from tolerance import assert_close


def _kernels(monkeypatch, fused: str):
    import desmoe.kernels as kernels

    monkeypatch.setenv("DESMOE_FUSED_KERNELS", fused)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_loop", None)
    monkeypatch.setattr(kernels, "_rows", None)
    if fused == "1":
        need(kernels.rows_cpu(), "the CPU row kernels")
    else:
        assert kernels.rows_cpu() is None


def _routes(num_tokens: int, k: int, num_experts: int, capacity: int | None, seed: int):
    """Sorted routes as the dispatcher makes them: choice-major route ids, stable sort by expert,
    at most ``capacity`` routes per expert (earlier routes win)."""
    gen = torch.Generator().manual_seed(seed)
    expert_ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_tokens)])
    route_expert = expert_ids.t().reshape(-1)
    order = torch.argsort(route_expert, stable=True)
    if capacity is not None:
        counts = torch.bincount(route_expert, minlength=num_experts)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(order.numel()) - starts[route_expert[order]]
        order = order[slot < capacity]
    plan = RoutePlan(order, num_tokens, k)
    return plan, plan.token_of_route, plan.pos, order


def _reference(x, rows, token_of_route, order, num_tokens):
    """The same math with plain indexing in fp64: gather, and each token's kept routes summed."""
    gathered = x.double()[token_of_route]
    summed = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float64).index_add_(0, token_of_route, rows.double())
    return gathered, summed


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,capacity", [(1, None), (2, None), (3, None), (2, 3), (4, 2)])
def test_permute_unpermute_and_gradients(monkeypatch, fused, dtype, k, capacity):
    _kernels(monkeypatch, fused)
    num_tokens, d = 13, 37  # odd width: no vector-width multiple
    plan, token_of_route, pos, order = _routes(num_tokens, k, 6, capacity, seed=k)
    if capacity is not None:
        assert (pos < 0).any(), "the capacity must drop routes for this case to test them"
    torch.manual_seed(0)
    x = torch.randn(num_tokens, d).to(dtype).requires_grad_(True)
    rows_in = torch.randn(order.numel(), d).to(dtype).requires_grad_(True)
    g_rows, g_out = torch.randn(order.numel(), d).to(dtype), torch.randn(num_tokens, d).to(dtype)

    rows = permute(x, plan)
    out = unpermute(rows_in, plan)
    assert rows.dtype == dtype and out.dtype == dtype and out.shape == (num_tokens, d)
    (rows.float() * g_rows.float()).sum().backward()
    (out.float() * g_out.float()).sum().backward()

    want_rows, want_out = _reference(x.detach(), rows_in.detach(), token_of_route, order, num_tokens)
    assert torch.equal(rows.double(), want_rows)  # a gather copies exactly
    assert_close(out, want_out, terms=k, dtype=dtype, roundings=1, stored=dtype)
    # adjoints: grad_x sums each token's kept routes of g_rows; grad_rows gathers g_out
    _, want_gx = _reference(x.detach(), g_rows, token_of_route, order, num_tokens)
    assert_close(x.grad, want_gx, terms=k, dtype=dtype, roundings=1, stored=dtype)
    assert torch.equal(rows_in.grad.double(), g_out.double()[token_of_route])
    dropped_everywhere = (pos < 0).all(0)
    assert (out[dropped_everywhere] == 0).all() and (x.grad[dropped_everywhere] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_torch_ops(monkeypatch, dtype):
    """Top-2 without drops: both paths add the same two values in fp32 and round once, so they agree
    bit for bit (x + y is exact in either order)."""
    plan, token_of_route, pos, order = _routes(64, 2, 8, None, seed=5)
    torch.manual_seed(1)
    rows_in = torch.randn(order.numel(), 300).to(dtype)
    results = []
    for fused in ("1", "0"):
        _kernels(monkeypatch, fused)
        results.append(unpermute(rows_in, plan))
    assert torch.equal(results[0], results[1])


def test_mixed_precision_combine(monkeypatch):
    """fp32 rows (the EP path weights them in fp32) into a bf16 model: summed in fp32, rounded once."""
    _kernels(monkeypatch, "1")
    plan, token_of_route, pos, order = _routes(20, 2, 4, None, seed=2)
    rows_in = torch.randn(order.numel(), 16, requires_grad=True)
    out = unpermute(rows_in, plan, torch.bfloat16)
    _, want = _reference(rows_in.detach(), rows_in.detach(), token_of_route, order, 20)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.float().bfloat16())
    out.float().sum().backward()
    assert rows_in.grad.dtype == torch.float32 and torch.equal(rows_in.grad, torch.ones_like(rows_in))


def test_row_kernels_refuse_bad_indices():
    """Wrong index tensors and rows out of range are refused before the unchecked C loops run."""
    from desmoe.kernels import rows_cpu

    rows = need(rows_cpu(), "the CPU row kernels")
    with pytest.raises(ValueError, match="int64"):
        rows.gather(torch.randn(4, 3), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[k, tokens\]"):
        rows.gather_sum(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="out of range for 4 rows"):
        rows.gather(torch.randn(4, 3), torch.tensor([0, 4]))
    with pytest.raises(IndexError, match="out of range for 4 rows"):
        rows.gather(torch.randn(4, 3), torch.tensor([-1, 2]))
    with pytest.raises(IndexError, match="out of range for 4 rows"):
        rows.gather_sum(torch.randn(4, 3), torch.tensor([[0, 4], [-1, 1]]))
    assert rows.gather_sum(torch.ones(4, 3), torch.tensor([[0, -1], [-1, -1]])).tolist() == [[1.0] * 3, [0.0] * 3]


def test_torch_ops_never_build_the_route_positions(monkeypatch):
    """Only the CPU kernels read ``pos``; the torch ops (a GPU's path) run without building it."""
    _kernels(monkeypatch, "0")
    plan, token_of_route, _, order = _routes(16, 2, 4, None, seed=3)
    fresh = RoutePlan(order, 16, 2)
    x = torch.randn(16, 8, requires_grad=True)
    unpermute(permute(x, fresh) * 2, fresh).sum().backward()
    assert fresh._pos is None
    assert torch.equal(x.grad, torch.full_like(x, 4.0))  # two routes per token, each times 2
