"""Router conventions, exposed logits, aux loss and expert counts on hand-built cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from tolerance import assert_close, bound
from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert, load_balancing_loss


def hand_router(k=1, **kw):
    router = LinearRouter(2, 2, k, **kw)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(2))
    return router


def test_aux_loss_and_counts_hand_case():
    # logits = x (identity router): three tokens prefer expert 0, one prefers expert 1
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    block = MoEBlock(2, SwiGLUExpert(2, 4), hand_router(k=1, normalize_topk=False))
    block(x)
    assert block.last_stats.tokens_per_expert.tolist() == [3, 1]
    a = 1 / (1 + math.exp(-2.0))  # softmax([2, 0])[0]
    mean_p0, mean_p1 = (3 * a + (1 - a)) / 4, (3 * (1 - a) + a) / 4
    expected = 2 * (mean_p0 * 3 / 4 + mean_p1 * 1 / 4)
    assert abs(block.aux_loss.item() - expected) <= bound(4 + 2 + 2, scale=expected)  # fp32: means over 4 tokens
    # perfectly uniform routing scores exactly 1
    uniform = load_balancing_loss(torch.full((4, 2), 0.5), torch.tensor([[0], [1], [0], [1]]), 2)
    assert uniform.item() == pytest.approx(1.0)


def test_exposed_logits_match_recomputation_and_get_gradients():
    torch.manual_seed(0)
    block = MoEBlock(8, SwiGLUExpert(8, 16), LinearRouter(8, 4, 2))
    x = torch.randn(3, 5, 8)
    block(x)
    logits = block.last_routing.logits
    ref = F.linear(x.reshape(-1, 8).float(), block.router.proj.weight.float())
    assert logits.dtype == torch.float32
    assert torch.equal(logits, ref)
    # distillation-style losses on the exposed logits reach the router weights
    F.kl_div(logits.log_softmax(-1), torch.full_like(logits, 0.25), reduction="batchmean").backward()
    assert block.router.proj.weight.grad.abs().sum() > 0


def test_logits_are_taken_before_noise():
    torch.manual_seed(0)
    router = LinearRouter(8, 4, 1, noise="gaussian", noise_eps=5.0).train()
    x = torch.randn(64, 8)
    routing = router(x)
    assert torch.equal(routing.logits, F.linear(x, router.proj.weight))
    # noise changed some choices, so selection is not simply argmax of the clean scores
    assert not torch.equal(routing.expert_ids[:, 0], routing.scores.argmax(-1))


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_weights_with_and_without_renormalisation(normalize):
    torch.manual_seed(1)
    router = LinearRouter(8, 6, 3, normalize_topk=normalize)
    routing = router(torch.randn(10, 8))
    picked = routing.scores.gather(1, routing.expert_ids)
    assert torch.equal(routing.expert_ids, routing.scores.topk(3, dim=-1).indices)
    if normalize:
        assert_close(routing.weights.sum(-1), torch.ones(10), terms=3)
        assert_close(routing.weights, picked / picked.sum(-1, keepdim=True), terms=3)
    else:
        assert torch.equal(routing.weights, picked)  # softmax over all experts, not renormalised


def test_sigmoid_scores_scaling_and_allowed_experts():
    torch.manual_seed(2)
    router = LinearRouter(8, 6, 2, score_func="sigmoid", normalize_topk=False, scaling=2.5)
    x = torch.randn(7, 8)
    routing = router(x)
    assert_close(routing.scores, torch.sigmoid(x @ router.proj.weight.t()), terms=8)
    assert_close(routing.weights, 2.5 * routing.scores.gather(1, routing.expert_ids), terms=1)
    router.allowed_experts = torch.tensor([False, False, True, True, True, False])
    assert set(router(x).expert_ids.flatten().tolist()) <= {2, 3, 4}


def test_shared_expert_is_always_on():
    torch.manual_seed(3)
    shared = SwiGLUExpert(8, 8)
    block = MoEBlock(8, SwiGLUExpert(8, 16), LinearRouter(8, 4, 1), shared=shared)
    x = torch.randn(6, 8)
    with torch.no_grad():
        routed_only = MoEBlock.forward(block, x) - shared(x)
        for p in block.local_experts.parameters():
            p.zero_()
        assert_close(block(x), shared(x), terms=8 + 8 + 1)
    assert routed_only.abs().sum() > 0


def test_capacity_drops_later_routes_first():
    # four tokens all pick expert 0 first; capacity 2 keeps the first two first-choices
    x = torch.tensor([[3.0, 0.0]] * 4)
    block = MoEBlock(2, SwiGLUExpert(2, 4), hand_router(k=1, normalize_topk=False),
                     capacity_factor=1.0, min_capacity=1)
    out = block(x)
    assert block.last_stats.dropped.item() == 2
    assert out[:2].abs().sum() > 0 and out[2:].abs().sum() == 0


def global_counts_case():
    import deepspeed.comm as dist

    from desmoe.moe import global_tokens_per_expert

    rank = dist.get_rank()
    net = torch.nn.Sequential(MoEBlock(2, SwiGLUExpert(2, 4), hand_router(k=1)))
    x = torch.tensor([[2.0, 0.0]] * (rank + 1) + [[0.0, 2.0]] * 3)  # rank 0: 1/3, rank 1: 2/3
    net(x)
    local = net[0].last_stats.tokens_per_expert.tolist()
    return local, global_tokens_per_expert(net).tolist()


def test_tokens_per_expert_all_reduced(ranks):
    (l0, g0), (l1, g1) = ranks.run(global_counts_case)
    assert l0 == [1, 3] and l1 == [2, 3]
    assert g0 == g1 == [[3, 6]]
