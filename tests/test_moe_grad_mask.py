"""MoEBlock.weight_grad_mask: masked routes add nothing to their expert's weight
gradients, while outputs, input gradients and router gradients stay as without a
mask -- at EP=1 (fused grouped path, generic module path) and EP=2 (the mask
travels with the rows), checked against a per-route autograd reference."""
import pytest
import torch

from desmoe.moe import LinearRouter, MLPExpert, MoEBlock, SwiGLUExpert
from tolerance import assert_close

D, E, K, S = 16, 4, 2, 40
FWD = 2 * D + 24 + E + K  # router, expert in, expert out (24), softmax, combine
BWD = 2 * FWD + 2 * S  # the chain again, weight gradients summed over both ranks' tokens


def _block(kind: str, ep: int) -> MoEBlock:
    torch.manual_seed(0)
    expert = SwiGLUExpert(D, 24) if kind == "swiglu" else MLPExpert(D, 24)
    block = MoEBlock(D, expert, LinearRouter(D, E, K), ep_size=ep)
    block.set_deepspeed_parallelism()
    block.init_experts(seed=7)
    return block


def _run(block, x, upstream, mask):
    block.zero_grad(set_to_none=True)
    block.weight_grad_mask = mask
    xi = x.clone().requires_grad_(True)
    y = block(xi)
    (y * upstream).sum().backward()
    block.weight_grad_mask = None
    return y.detach(), xi.grad, [p.grad.clone() for p in block.router.parameters()]


def _reference_expert_grads(block, x, upstream, mask):
    """One expert call per (token, choice); a masked route sees detached expert weights."""
    routing = block.last_routing
    experts = block.local_experts
    for p in experts.parameters():
        p.grad = None
    total = 0.0
    for i in range(x.shape[0]):
        for j in range(K):
            e = int(routing.expert_ids[i, j])
            params = {n: (p if mask[i, e] else p.detach()) for n, p in experts[e].named_parameters()}
            out = torch.func.functional_call(experts[e], params, (x[i:i + 1],))
            total = total + (routing.weights[i, j].detach() * out * upstream[i:i + 1]).sum()
    total.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in experts.parameters()]


def mask_case(kind: str):
    import deepspeed.comm as dist

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(50 + rank)  # each rank its own tokens and mask
    x, upstream = torch.randn(S, D, generator=gen), torch.randn(S, D, generator=gen)
    mask = torch.rand(S, E, generator=gen) < 0.5
    ep1, ep2 = _block(kind, 1), _block(kind, 2)
    y_plain, gx_plain, gr_plain = _run(ep1, x, upstream, None)
    y1, gx1, gr1 = _run(ep1, x, upstream, mask)
    got1 = [p.grad.clone() for p in ep1.local_experts.parameters()]
    _run(ep1, x, upstream, None)
    plain1 = [p.grad.clone() for p in ep1.local_experts.parameters()]
    y2, gx2, gr2 = _run(ep2, x, upstream, mask)
    # (b) outputs, input and router gradients do not see the mask, at EP=1 and EP=2
    assert torch.equal(y1, y_plain) and torch.equal(gx1, gx_plain)
    assert all(torch.equal(a, b) for a, b in zip(gr1, gr_plain))
    assert_close(y2, y_plain, terms=FWD, msg="EP=2 output")
    assert_close(gx2, gx_plain, terms=BWD, msg="EP=2 input gradient")
    for a, b in zip(gr2, gr_plain):
        assert_close(a, b, terms=BWD, msg="EP=2 router gradient")
    # (a) EP=1: masked expert gradients == per-route reference, and differ from the unmasked ones
    ref = _reference_expert_grads(ep1, x, upstream, mask)
    for g, r in zip(got1, ref):
        assert_close(g, r, terms=BWD, msg="EP=1 masked expert gradient")
    assert any((g - p).abs().max() > 1e-3 for g, p in zip(got1, plain1)), "the mask changed nothing"
    # (a) EP=2: expert g's gradient gathers both ranks' kept routes = sum of the EP=1 references
    for r in ref:
        dist.all_reduce(r)
    per = len(ref) // E
    got2 = [p.grad for p in ep2.local_experts.parameters()]
    for local_id, g in enumerate(ep2.local_global_ids()):
        for a, b in zip(got2[local_id * per:(local_id + 1) * per], ref[g * per:(g + 1) * per]):
            assert_close(a, b, terms=BWD, msg=f"EP=2 masked gradient of expert {g}")
    return int(mask.gather(1, ep1.last_routing.expert_ids).logical_not().sum())


@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
def test_weight_grad_mask_matches_reference_ep1_ep2(ranks, kind):
    masked_routes = ranks.run(mask_case, kind)
    assert all(n > 0 for n in masked_routes), "no route was masked: the test would prove nothing"


def test_mask_shape_is_checked():
    block = MoEBlock(D, SwiGLUExpert(D, 8), LinearRouter(D, E, K))
    block.weight_grad_mask = torch.ones(S, E + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="weight_grad_mask"):
        block(torch.randn(S, D))
    with torch.no_grad():  # no backward, no mask needed: evaluation ignores it
        block(torch.randn(S, D))
