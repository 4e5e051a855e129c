"""The routing rules the HF families need, on hand-built cases the reader can check by eye:
renormalised top-1, groups scored by their top-2 sum, a selection bias that picks but never weighs,
the auxiliary-loss-free bias step (2 real ranks agree on it), the clamped SwiGLU expert."""
import math

import pytest
import torch
import torch.nn.functional as F

from desmoe.moe import ClampedSwiGLUExpert, LinearRouter, MoEBlock, SwiGLUExpert


def identity_router(num_experts: int, k: int, **kw) -> LinearRouter:
    """logits = x (x has one column per expert)."""
    router = LinearRouter(num_experts, num_experts, k, **kw)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(num_experts))
    return router


def test_top1_renormalised_weight_is_one_and_unnormalised_is_the_score():
    x = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    on = identity_router(4, 1, normalize_topk=True)(x)
    off = identity_router(4, 1, normalize_topk=False)(x)
    assert on.expert_ids.tolist() == [[0]] and on.weights.tolist() == [[1.0]]  # Mixtral/OLMoE/Qwen top-1
    p0 = math.exp(2.0) / (math.exp(2.0) + 3)
    assert off.weights.item() == pytest.approx(p0, rel=1e-6)


def test_groups_scored_by_top2_sum_differ_from_max():
    # groups {0,1} and {2,3}: max picks group 0 (0.9 > 0.8); top-2 sum picks group 1 (0.8+0.7 > 0.9+0.0)
    logits = torch.logit(torch.tensor([[0.9, 1e-6, 0.8, 0.7]]))
    by_max = identity_router(4, 2, score_func="sigmoid", num_groups=2, topk_groups=1, group_score="max")(logits)
    by_sum = identity_router(4, 2, score_func="sigmoid", num_groups=2, topk_groups=1, group_score="top2_sum")(logits)
    assert sorted(by_max.expert_ids[0].tolist()) == [0, 1]
    assert sorted(by_sum.expert_ids[0].tolist()) == [2, 3]


def test_selection_bias_picks_but_does_not_weigh():
    x = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    router = identity_router(4, 1, score_func="sigmoid", normalize_topk=False, scaling=2.5, selection_bias=True)
    assert router(x).expert_ids.item() == 0
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))  # sigmoid(-1)+0.9 > sigmoid(1)
    routing = router(x)
    assert routing.expert_ids.item() == 3
    assert routing.weights.item() == pytest.approx(2.5 * torch.sigmoid(torch.tensor(-1.0)).item(), rel=1e-6)
    assert "selection_bias" in dict(router.named_buffers()) and "selection_bias" not in dict(router.named_parameters())


def test_clamped_swiglu_expert_matches_its_formula():
    torch.manual_seed(0)
    expert = ClampedSwiGLUExpert(4, 3, alpha=1.5, limit=0.4)
    x = torch.randn(5, 4) * 3
    h = x @ expert.gate_up.weight.t() + expert.gate_up.bias
    gate, up = h[:, :3].clamp(max=0.4), h[:, 3:].clamp(-0.4, 0.4)
    want = ((up + 1) * gate * torch.sigmoid(1.5 * gate)) @ expert.down.weight.t() + expert.down.bias
    assert torch.equal(expert(x), want)
    assert (h.abs() > 0.4).any()  # the clamps were active


def balancing_case():
    import deepspeed.comm as dist

    from desmoe.moe import update_selection_biases

    rank = dist.get_rank()
    block = MoEBlock(4, SwiGLUExpert(4, 8), identity_router(4, 1, score_func="sigmoid", selection_bias=True,
                                                             bias_update_rate=0.1))
    net = torch.nn.Sequential(block).train()
    # rank 0 sends 3 tokens to expert 0 and 1 to expert 1; rank 1 sends 2 to expert 0 and 2 to expert 2
    rows = {0: [0, 0, 0, 1], 1: [0, 0, 2, 2]}[rank]
    net(F.one_hot(torch.tensor(rows), 4).float() * 3)
    assert update_selection_biases(net) == 1
    net.eval()(torch.eye(4))  # eval forwards do not count
    assert block.pending_load is None
    return block.router.selection_bias.tolist()


def test_aux_loss_free_bias_step_uses_the_global_load(ranks):
    # global load [5, 1, 2, 0], mean 2: overloaded expert 0 down, experts 1 and 3 up, expert 2 unchanged
    b0, b1 = ranks.run(balancing_case)
    assert b0 == b1 == pytest.approx([-0.1, 0.1, 0.0, 0.1])
