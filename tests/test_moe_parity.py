"""EP=2 and EP=1 on the same weights compute the same function and gradients."""
import pytest
import torch

from desmoe.moe import LinearRouter, MLPExpert, MoEBlock, SwiGLUExpert
from tolerance import assert_close

# reduction lengths: router (d) + gate/up (d) + down (24) + combine (E) + shared expert (8); the backward
# runs the chain again and sums weight gradients over the tokens of both ranks (2 x 48)
FWD = 2 * 16 + 24 + 4 + 8
BWD = 2 * FWD + 96


def _pair(k, shared, capacity_factor, d=16, E=4):
    blocks = {}
    for ep in (1, 2):
        torch.manual_seed(0)  # dense parts (router, shared) identical on every rank and for both
        router = LinearRouter(d, E, k, normalize_topk=(k > 1))
        block = MoEBlock(d, SwiGLUExpert(d, 24), router, ep_size=ep, capacity_factor=capacity_factor,
                         min_capacity=1, shared=MLPExpert(d, 8) if shared else None, shared_gate=shared)
        block.set_deepspeed_parallelism()
        block.init_experts(seed=7)
        blocks[ep] = block
    return blocks[1], blocks[2]


def parity_case(k, shared, capacity_factor):
    import deepspeed.comm as dist

    rank = dist.get_rank()
    ep1, ep2 = _pair(k, shared, capacity_factor)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank has its own tokens
    x = torch.randn(2, 24, 16, generator=gen)
    upstream = torch.randn(2, 24, 16, generator=gen)
    out = {}
    for name, block in (("ep1", ep1), ("ep2", ep2)):
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        (y * upstream).sum().backward()
        out[name] = (y.detach(), xi.grad, block)
    y1, gx1, _ = out["ep1"]
    y2, gx2, _ = out["ep2"]
    assert_close(y2, y1, terms=FWD, msg="output")
    assert_close(gx2, gx1, terms=BWD, msg="input gradient")
    for (n1, p1), (n2, p2) in zip(ep1.router.named_parameters(), ep2.router.named_parameters()):
        assert_close(p2.grad, p1.grad, terms=BWD, msg=n1)
    if shared:
        for p1, p2 in zip(ep1.shared.parameters(), ep2.shared.parameters()):
            assert_close(p2.grad, p1.grad, terms=BWD, msg="shared expert")
    # Expert e's EP=2 gradient gathers the tokens of both ranks; with EP=1 each rank sees its own.
    summed = [p.grad.clone() for p in ep1.local_experts.parameters()]  # same order on every rank
    for g in summed:
        dist.all_reduce(g)
    per_expert = len(summed) // len(ep1.local_experts)
    for local_id, global_id in enumerate(ep2.local_global_ids()):
        mine = summed[global_id * per_expert:(global_id + 1) * per_expert]
        for g, p2 in zip(mine, ep2.local_experts[local_id].parameters()):
            assert_close(p2.grad, g, terms=BWD, msg=f"expert {global_id}")
    # and the experts' weights themselves are the same global experts
    for local_id, global_id in enumerate(ep2.local_global_ids()):
        for p1, p2 in zip(ep1.local_experts[global_id].parameters(), ep2.local_experts[local_id].parameters()):
            assert torch.equal(p1, p2)
    return float(ep2.last_stats.dropped)


@pytest.mark.parametrize("k,shared,capacity_factor", [
    (1, False, None), (2, False, None), (2, True, None), (3, False, None),
    (1, False, 1.0), (2, False, 0.5),
])
def test_ep2_equals_ep1(ranks, k, shared, capacity_factor):
    dropped = ranks.run(parity_case, k, shared, capacity_factor)
    if capacity_factor is not None and capacity_factor < 1:
        assert sum(dropped) > 0, "capacity case should actually drop routes"
    if capacity_factor is None:
        assert sum(dropped) == 0


def saved_case():
    """A bf16 EP=2 block keeps no fp32 copy of the experts' returned rows for backward: the route weights
    travel with the rows into the experts' activation (as with local experts)."""
    import deepspeed.comm as dist

    d = 16
    torch.manual_seed(0)
    block = MoEBlock(d, SwiGLUExpert(d, 24), LinearRouter(d, 4, 2, normalize_topk=True), ep_size=2)
    block.set_deepspeed_parallelism()
    block.init_experts(seed=7)
    block = block.to(torch.bfloat16)
    x = torch.randn(2, 24, d, generator=torch.Generator().manual_seed(dist.get_rank())).bfloat16().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = block(x)
    y.float().sum().backward()
    # Every token's two routes as they come back; the router's fp32 copy of x ([tokens, d]) is its own.
    rows = 2 * x.shape[0] * x.shape[1]
    wide = [t for t in saved if t.dtype == torch.float32 and tuple(t.shape) == (rows, d)]
    assert not wide, f"{len(wide)} fp32 [{rows}, {d}] tensors kept for backward"
    assert all(p.grad is not None for p in block.router.parameters())  # the weights' gradient came back
    return float(x.grad.float().abs().sum())


def test_ep2_keeps_no_fp32_copy_of_the_rows(ranks):
    assert all(g > 0 for g in ranks.run(saved_case))


def branches_case():
    """EP = 1: token mode (the experts gather and combine) and the whole-batch branch (permute, the experts
    via _run_experts, unpermute; taken without the CPU row kernels) compute the same block."""
    import desmoe.moe.dispatcher as dispatcher

    block, _ = _pair(3, True, 1.0)  # top-3 with capacity drops and a shared expert
    gen = torch.Generator().manual_seed(5)
    x, upstream = torch.randn(2, 24, 16, generator=gen), torch.randn(2, 24, 16, generator=gen)
    results = []
    for fused in (True, False):
        dispatcher_fuses = dispatcher.fuses_rows
        if not fused:
            dispatcher.fuses_rows = lambda x, experts: False
        try:
            block.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y = block(xi)
            (y * upstream).sum().backward()
        finally:
            dispatcher.fuses_rows = dispatcher_fuses
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None])
    assert float(block.last_stats.dropped) > 0
    (y1, *g1), (y2, *g2) = results
    assert len(g1) == len(g2)
    assert_close(y1, y2, terms=FWD, msg="output")
    for a, b in zip(g1, g2):
        assert_close(a, b, terms=BWD, msg="gradient")


def test_token_mode_equals_the_whole_batch_branch(ranks):
    ranks.run(branches_case)
