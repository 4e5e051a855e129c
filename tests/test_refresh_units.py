"""``refresh_master_weights`` re-reads an expert unit's fp32 master copy only whole: naming part of a unit left the
written experts' new weights to be overwritten by the old master copy at the next step, without a word."""
import pytest

from test_freeze_zero2 import tiny_engine


def partial_unit_case():
    import deepspeed.comm as dist

    from desmoe.engine import refresh_master_weights

    engine, _ = tiny_engine(ep_size=2, unit=lambda block, expert: (block, expert // 2))  # units of two experts
    rank = dist.get_rank()
    mine = (0, 2 * rank)  # an expert this rank holds (EP=2: experts 0-1 on rank 0, 2-3 on rank 1)
    refresh_master_weights(engine, [mine, (mine[0], mine[1] + 1)])  # the whole unit: fine
    with pytest.raises(ValueError) as err:
        refresh_master_weights(engine, [mine])
    return str(err.value)


def test_part_of_a_unit_is_refused(ranks):
    for msg in ranks.run(partial_unit_case):
        assert "re-read only whole" in msg and "\n" not in msg
