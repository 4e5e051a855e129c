"""DGES matrices on a hand-built routing log, momentum refresh, ESFT selection, phase table."""
import pytest
import torch

from desmoe.recipes.des_moe import esft
from desmoe.recipes.des_moe.config import DGESConfig, ScheduleConfig
from desmoe.recipes.des_moe.dges import DomainExpertMap, specialization_mask
from desmoe.errors import ConfigError
from desmoe.recipes.des_moe.schedule import (Phase, TrainableSet, boundaries, check_resumed_boundaries, phase_at,
                                               trainable_set)


def hand_log():
    # 1 layer, 3 domains, 4 experts, top-2.  Domain 0: e0 x4, e1 x2, e2 x1, e3 x1 over 4 tokens.
    # Domain 1: e2 x3, e3 x2, e1 x1 over 3 tokens.  Domain 2 never appears.  One padding token (-1).
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [2, 3], [2, 1], [3, 2], [1, 0]])
    dom = torch.tensor([0, 0, 0, 0, 1, 1, 1, -1])
    return ids, dom


def test_affinity_and_mask_on_hand_built_log():
    dmap = DomainExpertMap(1, 3, 4, DGESConfig(phi=0.6))
    ids, dom = hand_log()
    dmap.record(0, ids[:5], dom[:5])  # two calls = two micro-batches of one window
    dmap.record(0, ids[5:], dom[5:])
    dmap.refresh()
    expected = torch.tensor([[4 / 4, 2 / 4, 1 / 4, 1 / 4], [0, 1 / 3, 3 / 3, 2 / 3], [0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(dmap.A[0], expected)
    assert dmap.M[0].tolist() == [[True, False, False, False], [False, False, True, True], [False] * 4]
    assert dmap.experts_for(0, 0) == [0] and dmap.experts_for(0, 1) == [2, 3] and dmap.experts_for(0, 2) == []
    assert dmap.claimed_by_several(0) == []
    assert dmap.window.sum() == 0, "a refresh starts a new window"


@pytest.mark.parametrize("momentum_on", ["new", "old"])
def test_momentum_refresh(momentum_on):
    dmap = DomainExpertMap(1, 2, 4, DGESConfig(momentum=0.9, momentum_on=momentum_on))
    ids, dom = hand_log()
    dmap.record(0, ids, dom)
    dmap.refresh()
    first = dmap.A.clone()
    # second window: domain 0 now prefers expert 3 (every token picks 3 and 1)
    dmap.record(0, torch.tensor([[3, 1]] * 5), torch.zeros(5, dtype=torch.long))
    dmap.refresh()
    fresh = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.float64)
    w_new = 0.9 if momentum_on == "new" else 0.1
    torch.testing.assert_close(dmap.A[0], w_new * fresh + (1 - w_new) * first[0])
    # "new": the window dominates, domain 0 moves to experts 1 and 3; "old": 0 stays, 1 (0.55 >= 0.54) joins
    assert dmap.experts_for(0, 0) == ([1, 3] if momentum_on == "new" else [0, 1])
    assert dmap.experts_for(0, 1) == [2, 3], "a domain absent from the window keeps its set"


def test_mask_threshold_is_relative_to_row_max():
    A = torch.tensor([[10.0, 6.1, 5.9, 0.0], [0.1, 0.061, 0.059, 0.0]])
    assert specialization_mask(A, 0.6).tolist() == [[True, True, False, False]] * 2


def test_esft_scores_and_top_p_selection():
    from desmoe.moe.router import Routing

    prof = esft.RoutingProfile(1, 4)
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])
    ids = torch.tensor([[0, 1], [1, 2]])
    prof.record(0, Routing(scores.log(), scores, ids, scores.gather(1, ids)))
    torch.testing.assert_close(prof.token_scores()[0], torch.tensor([1, 2, 1, 0], dtype=torch.float64) / 4)
    torch.testing.assert_close(prof.gate_scores()[0], torch.tensor([0.5, 0.9, 0.2, 0], dtype=torch.float64) / 2)
    assert esft.select_top_p(torch.tensor([0.1, 0.5, 0.3, 0.1]), 0.2) == [1]
    assert esft.select_top_p(torch.tensor([0.1, 0.5, 0.3, 0.1]), 0.6) == [1, 2]  # the crossing expert is in
    assert esft.select_top_p(torch.tensor([0.1, 0.5, 0.3, 0.1]), 0.5) == [1]


def test_phase_boundaries_and_trainable_sets():
    cfg = ScheduleConfig()
    assert boundaries(100, cfg) == (20, 70)
    phases = [phase_at(s, 100, cfg) for s in range(100)]
    assert phases.count(Phase.WARMUP) == 20 and phases.count(Phase.STABILIZE) == 50
    assert phases[19] == Phase.WARMUP and phases[20] == Phase.STABILIZE and phases[70] == Phase.CONSOLIDATE
    assert trainable_set(Phase.WARMUP, cfg) == TrainableSet(router=True, backbone=True, experts="none")
    assert trainable_set(Phase.WARMUP, ScheduleConfig(warmup="fig1")) == TrainableSet(True, False, "all")
    assert trainable_set(Phase.STABILIZE, cfg) == TrainableSet(True, False, "domain")
    assert trainable_set(Phase.CONSOLIDATE, cfg) == TrainableSet(False, False, "domain")
    assert trainable_set(Phase.CONSOLIDATE, cfg, dges=False) == TrainableSet(False, False, "all")


@pytest.mark.parametrize("steps, start, refused", [
    (100, 50, False),   # the same T: nothing moves
    (100, 0, False),    # nothing reached yet
    (300, 10, False),   # T1 20 -> 60, T2 70 -> 210: both still ahead of step 10
    (300, 20, True),    # T1 = 20 was reached: warm-up would re-open
    (120, 50, True),    # T1 20 -> 24, reached either way: DGES's refreshes count from it
    (101, 50, False),   # T1 = round(20.2) = 20 holds; T2 70 -> 71 is ahead
    (60, 30, True),     # T2 70 -> 42: step 30 stays in phase II, but the new T1 = 12 moved behind it
    (98, 69, True),     # T1 holds, T2 70 -> 69: the new T2 would already have been reached
    (98, 68, False),    # the same change one step earlier: T2 is still ahead either way
])
def test_resumed_phase_boundaries(steps, start, refused):
    """train.steps may change on resume only where no boundary reached by the resumed step moves."""
    if refused:
        with pytest.raises(ConfigError, match=rf"key 'train.steps': expected a value that keeps the phase "
                           rf"boundaries reached by the resumed step {start} \(T1=20, T2=70;"):
            check_resumed_boundaries((20, 70), steps, ScheduleConfig(), start)
    else:
        check_resumed_boundaries((20, 70), steps, ScheduleConfig(), start)


def test_replacing_one_window_tensor_keeps_the_others_pending_counts():
    """record_model's counts wait on the device for both window tensors; a setter of one of them dropped the
    other's unread counts (nothing assigns one alone today: a trap for the next caller that does)."""
    m = DomainExpertMap(1, 2, 4)
    ids, dom = torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1])
    m._pending = m._counts(ids, dom).unsqueeze(0)  # what record_model leaves for one layer
    m.window_tokens = torch.full((1, 2), 5.0, dtype=torch.float64)
    assert m.window[0].tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    m._pending = m._counts(ids, dom).unsqueeze(0)
    m.window = torch.zeros(1, 2, 4, dtype=torch.float64)
    assert m.window_tokens.tolist() == [[6.0, 6.0]] and m.window.sum() == 0
