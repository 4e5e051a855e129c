"""The loop backend's expert loop in C (desmoe.kernels.experts: one call each way, the forward in row tiles
on MKL's packed GEMM) computes what the Python loop computes (GroupedSwiGLU with ``DESMOE_EXPERT_LOOP=0``):
forward and every gradient, in token order and expert order, with and without route weights and
weight-gradient masks, frozen and empty experts, experts crossing tile edges; and refuses bad inputs."""
import platform

import pytest
import torch

import desmoe.kernels as kernels
from desmoe.moe import SwiGLUExpert
from desmoe.moe.grouped import grouped_swiglu
from kernelcheck import need
from tolerance import assert_close


def _loop():
    loop = kernels.expert_loop_cpu()
    if loop is None:
        pytest.skip("torch's BLAS is not MKL on this machine: the Python loop runs (tested elsewhere)")
    return loop


def test_the_c_loop_is_used_where_torch_has_mkl():
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.mkl.is_available():
        need(kernels.swiglu_cpu())  # the C library itself, first
        assert kernels.expert_loop_cpu() is not None, "torch's MKL routines should be found on this machine"


def _case(token_mode, k, counts, d, f, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(counts)
    tokens = n // k + 3 if token_mode else n
    # in token mode each row is one of a token's routes: tokens appear about k times, the last three never
    # (all their routes dropped)
    tok = torch.randperm(n, generator=gen) % (tokens - 3) if token_mode else None
    x = torch.randn(tokens, d, generator=gen)
    w = torch.rand(n, generator=gen)
    upstream = torch.randn(tokens, d, generator=gen)
    return x, tok, w, upstream


def _python(monkeypatch, x, counts, experts, w, keep, tok, upstream):
    monkeypatch.setenv("DESMOE_EXPERT_LOOP", "0")
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True) if w is not None else None
    out = grouped_swiglu(x, counts, experts, w, keep, backend="loop", token_of_row=tok)
    (out * upstream).sum().backward()
    grads = [p.grad.clone() if p.grad is not None else None for e in experts for p in (e.gate_up.weight, e.down.weight)]
    for p in experts.parameters():
        p.grad = None
    monkeypatch.delenv("DESMOE_EXPERT_LOOP")
    return out.detach(), x.grad, (w.grad if w is not None else None), grads


@pytest.mark.parametrize("token_mode", [True, False])
@pytest.mark.parametrize("weighted,masked,frozen", [(True, False, False), (False, False, False), (True, True, False),
                                                    (True, False, True), (False, True, True)])
def test_c_loop_equals_the_python_loop(monkeypatch, token_mode, weighted, masked, frozen):
    loop = _loop()
    torch.manual_seed(0)
    d, f, k = 21, 40, 2  # odd widths: tails of every vector loop
    counts = [37, 0, 16, 5, 51]  # an empty expert; with 16-row tiles, experts of 3+, 1 and 4 tiles, ragged ends
    experts = torch.nn.ModuleList(SwiGLUExpert(d, f) for _ in counts)
    if frozen:
        experts[0].gate_up.weight.requires_grad_(False)
        experts[4].down.weight.requires_grad_(False)
    x, tok, w, upstream = _case(token_mode, k, counts, d, f, seed=1 + token_mode)
    w = w if weighted else None
    keep = (torch.rand(sum(counts), generator=torch.Generator().manual_seed(3)) > 0.3) if masked else None
    ref, ref_gx, ref_gw, ref_grads = _python(monkeypatch, x, counts, experts, w, keep, tok, upstream)

    weights = [p for e in experts for p in (e.gate_up.weight, e.down.weight)]
    out, h_all = loop.forward(x, counts, weights, w, tok, tile_bytes=1)  # the smallest tiles: 16 rows
    need = [p.requires_grad for p in weights]
    gx, gw, grads = loop.backward(x, counts, weights, w, tok, h_all, upstream, keep, need)

    chain = d + f + k
    assert_close(out, ref, terms=chain)
    assert_close(gx, ref_gx, terms=2 * chain)
    if weighted:
        assert_close(gw, ref_gw, terms=2 * chain)
    else:
        assert gw is None
    rows = max(counts)
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        if not need[i]:
            assert got is None and want is None
        else:
            assert_close(got, want, terms=2 * chain + rows, msg=f"weight {i}")
    assert (grads[2] == 0).all() and (grads[3] == 0).all()  # the empty expert: zeros, not stale memory
    if token_mode:
        unseen = torch.ones(x.shape[0], dtype=torch.bool)
        unseen[tok] = False
        assert unseen.any() and (out[unseen] == 0).all() and (gx[unseen] == 0).all()


def test_tiles_do_not_change_the_result():
    """The forward's tiles only change which rows one GEMM call sees: 16-row tiles and one tile per expert
    give the same output and pre-activations (each row's dot products are the same ones)."""
    loop = _loop()
    torch.manual_seed(0)
    d, f, counts = 32, 48, [70, 3, 0, 33]
    experts = torch.nn.ModuleList(SwiGLUExpert(d, f) for _ in counts)
    weights = [p for e in experts for p in (e.gate_up.weight, e.down.weight)]
    x, tok, w, _ = _case(True, 2, counts, d, f, seed=5)
    small, h_small = loop.forward(x, counts, weights, w, tok, tile_bytes=1)
    whole, h_whole = loop.forward(x, counts, weights, w, tok, tile_bytes=1 << 30)
    assert_close(small, whole, terms=d + f + 2)
    assert_close(h_small, h_whole, terms=d)


def test_c_loop_refuses_mismatched_inputs_in_one_line():
    loop = _loop()
    d, f, counts = 8, 12, [3, 2]
    experts = torch.nn.ModuleList(SwiGLUExpert(d, f) for _ in counts)
    weights = [p.detach() for e in experts for p in (e.gate_up.weight, e.down.weight)]
    x = torch.randn(5, d)
    cases = [
        (lambda: loop.forward(torch.randn(5, d + 1), counts, weights, None, None), "expected \\[5, 8\\]"),
        (lambda: loop.forward(x, counts, weights[:1] + [weights[1].t()] + weights[2:], None, None), "expert weight 1"),
        (lambda: loop.forward(x, counts, weights, torch.rand(4), None), "route weights: expected \\[5\\]"),
        (lambda: loop.forward(x, counts, weights, None, torch.tensor([0, 1, 2, 3, 9])), "out of range"),
        (lambda: loop.forward(x, counts, weights, None, torch.arange(4)), "token_of_row: expected 5"),
        (lambda: loop.backward(x, counts, weights, None, None, torch.empty(5, 2 * f), x, torch.ones(4, dtype=torch.bool),
                               [True] * 4), "keep: expected a bool \\[5\\]"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, IndexError), match=message) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("token_mode", [True, False])
def test_c_loop_with_no_rows_at_all(token_mode):
    """A rank that received no rows (EP), or tokens whose routes were all dropped: zeros out, zero gradients,
    not stale memory."""
    loop = _loop()
    d, f, counts = 8, 12, [0, 0]
    experts = torch.nn.ModuleList(SwiGLUExpert(d, f) for _ in counts)
    weights = [p.detach() for e in experts for p in (e.gate_up.weight, e.down.weight)]
    x = torch.randn(5 if token_mode else 0, d)
    tok = torch.empty(0, dtype=torch.int64) if token_mode else None
    out, h_all = loop.forward(x, counts, weights, torch.rand(0), tok)
    gx, gw, grads = loop.backward(x, counts, weights, torch.rand(0), tok, h_all, torch.randn_like(x), None,
                                  [True] * 4)
    assert out.shape == x.shape and (out == 0).all() and (gx == 0).all() and gw.shape == (0,)
    assert all((g == 0).all() for g in grads)
