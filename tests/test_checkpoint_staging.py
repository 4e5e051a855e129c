"""What a killed job leaves in ``checkpoints/.staging`` (desmoe/checkpoint.py) does not stay there for good:
a half-written tag of a step the resumed run never saves again (another train.save_every) and a tag that
pruning had renamed aside but not finished deleting are removed by the next save, on 2 real ranks."""
from test_freeze_zero2 import tiny_engine


def save_over_leftovers(ckpt_dir) -> list[str]:
    from desmoe import checkpoint

    engine, _ = tiny_engine(ep_size=2)
    checkpoint.save(engine, ckpt_dir, step=4, keep=1)
    # DeepSpeed copies its zero_to_fp32.py beside the tags it saves: only folders are what saves leave
    return sorted(p.name for p in (ckpt_dir / checkpoint.STAGING).iterdir() if p.is_dir())


def test_the_next_save_removes_what_killed_saves_left_in_staging(ranks, tmp_path):
    from desmoe import checkpoint

    ckpt = tmp_path / "ckpt"
    for left in ("step00000007", "step00000002.deleting", "step00000003.old"):
        (ckpt / checkpoint.STAGING / left).mkdir(parents=True)
        (ckpt / checkpoint.STAGING / left / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 4096)
    assert ranks.run(save_over_leftovers, ckpt) == [[], []]
    assert (ckpt / "latest").read_text() == "step00000004" and [t for _, t in checkpoint.tags(ckpt)] == ["step00000004"]
