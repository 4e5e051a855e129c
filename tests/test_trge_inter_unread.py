"""inter.* keys a routing with one group a sample never reads: refused in one line, not ignored."""
import pytest
import torch

from test_trge_config_values import DIGITS, _load, _refused  # noqa: F401  (the same loader and refusal reader)


@pytest.mark.parametrize("overrides,why", [(["inter.reading=own"], "inter.reading=own"),
                                           (["inter.max_groups=1"], "inter.max_groups=1")])
def test_temperature_is_refused_where_one_group_a_sample_ignores_it(overrides, why):
    assert _refused(*overrides, "inter.temperature=0.5") == (
        f"{DIGITS}: key 'inter.temperature': expected unset with {why} (one group a sample: the nearest, whatever "
        f"the temperature), got 0.5")
    assert _load(*overrides).inter.temperature == 0.1  # the default (trge_digits sets it) still loads
    assert _load("inter.temperature=0.5").inter.temperature == 0.5  # read with two groups a sample


@pytest.mark.parametrize("reading,extra", [("own", {}), ("sample_anchored", {"max_groups": 1}),
                                           ("task_anchored", {"max_groups": 1, "tau": 2.0})])
def test_why_the_temperature_is_unread_there(reading, extra):
    """The weights are the same for any temperature: what the refusal rests on (and where it is read)."""
    import dataclasses

    from desmoe.recipes.trge.inter_group import InterGroupConfig, group_weights

    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    f0 = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=-1)
    ids = torch.randint(-1, 4, (32,), generator=g)
    cfg = InterGroupConfig(reading=reading, **extra)
    w = [group_weights(dataclasses.replace(cfg, temperature=t), ids, f0, protos, 5) for t in (0.01, 0.1, 10.0)]
    assert torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])
    two = dataclasses.replace(cfg, reading="sample_anchored", max_groups=2, tau=InterGroupConfig.tau)
    assert not torch.equal(group_weights(dataclasses.replace(two, temperature=0.01), ids, f0, protos, 5),
                           group_weights(dataclasses.replace(two, temperature=10.0), ids, f0, protos, 5))
