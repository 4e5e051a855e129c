"""Global expert id <-> (EP rank, local id), named groups, and per-id initialisation."""
import pytest
import torch

from desmoe.moe import ExpertLayout, SwiGLUExpert, init_local_experts


def test_mapping_round_trip_and_deepspeed_convention():
    layout = ExpertLayout(num_experts=8, ep_size=4)
    assert layout.num_local == 2
    assert layout.owner(5) == (2, 1)  # DeepSpeed: global = ep_rank * num_local + local
    for g in range(8):
        assert layout.global_id(*layout.owner(g)) == g
    assert list(layout.local_global_ids(3)) == [6, 7]
    with pytest.raises(ValueError, match="divide"):
        ExpertLayout(num_experts=6, ep_size=4)
    with pytest.raises(ValueError, match="out of range"):
        layout.owner(8)


def test_named_groups():
    layout = ExpertLayout(num_experts=8, ep_size=2)
    names = layout.contiguous_groups("task", 4)
    assert names == ["task0", "task1", "task2", "task3"]
    assert layout.group("task2") == (4, 5)
    layout.define_group("math", [7, 1, 1])
    assert layout.group("math") == (1, 7)
    assert layout.groups_of(1) == ["task0", "math"]
    with pytest.raises(KeyError, match="no expert group 'law'"):
        layout.group("law")
    with pytest.raises(ValueError):
        layout.define_group("bad", [9])


def _experts(n):
    return torch.nn.ModuleList(SwiGLUExpert(4, 8) for _ in range(n))


def test_independent_init_does_not_depend_on_ep_size():
    full = _experts(4)
    init_local_experts(full, ExpertLayout(4, 1), ep_rank=0, seed=3)
    for ep_rank in (0, 1):
        half = _experts(2)
        init_local_experts(half, ExpertLayout(4, 2), ep_rank=ep_rank, seed=3)
        for local_id in range(2):
            g = ep_rank * 2 + local_id
            assert all(torch.equal(a, b) for a, b in zip(half[local_id].parameters(), full[g].parameters()))
    assert not torch.equal(full[0].gate_up.weight, full[1].gate_up.weight)


def test_copies_init_gives_identical_experts():
    experts = _experts(4)
    init_local_experts(experts, ExpertLayout(4, 1), ep_rank=0, seed=3, mode="copies")
    for e in experts[1:]:
        assert all(torch.equal(a, b) for a, b in zip(e.parameters(), experts[0].parameters()))
