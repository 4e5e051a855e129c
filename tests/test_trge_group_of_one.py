"""groups.noisy with one expert a group changes no number: refused in one line naming the key, not ignored."""
import pytest
import torch

from test_trge_config_values import DIGITS, _load, _refused  # noqa: F401  (the same loader and refusal reader)


@pytest.mark.parametrize("method", ["trge", "continual_ft"])
def test_noisy_is_refused_with_one_expert_a_group(method):
    assert _refused(f"method={method}", "groups.experts_per_group=1", "groups.top_k=1", "groups.noisy=false") == (
        f"{DIGITS}: key 'groups.noisy': expected unset with groups.experts_per_group=1 (one expert a group: its gate "
        f"weight is 1, noisy or not), got False")
    assert _load(f"method={method}", "groups.experts_per_group=1", "groups.top_k=1").groups.noisy  # the default
    assert not _load(f"method={method}", "groups.noisy=false").groups.noisy  # read with two experts a group


def test_the_pool_reads_noisy_with_one_expert_a_group():
    """shared_pool's routers pick from all T * N_g experts of the pool: the noise moves that choice."""
    assert not _load("method=shared_pool", "groups.experts_per_group=1", "groups.top_k=1",
                     "groups.noisy=false").groups.noisy


def test_why_noise_is_unread_in_a_group_of_one():
    """The training-mode routing of a one-expert group is the same with and without noise; with two it is not."""
    from desmoe.recipes.trge.intra_group import GroupContext, GroupRouter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    weights = torch.softmax(torch.randn(64, 3, generator=g), dim=1)

    def routes(group_size, noisy):
        ctx = GroupContext()
        router = GroupRouter(16, 3, group_size, 1, ctx, max_groups=3, noisy=noisy).train()
        init = torch.Generator().manual_seed(2)  # the same gates with and without noise
        for gate in router.gates:  # trained-like gates: nonzero logits and noise scales
            torch.nn.init.normal_(gate.w_gate, generator=init)
            torch.nn.init.normal_(gate.w_noise, generator=init)
        ctx.group_weights = weights
        torch.manual_seed(1)
        r = router(x)
        return r.expert_ids, r.weights

    for a, b in zip(routes(1, True), routes(1, False)):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(routes(2, True), routes(2, False)))
