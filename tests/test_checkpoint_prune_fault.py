"""A save whose pruning of older tags fails (a busy or immutable folder on a network disk) is still a save: the
run goes on with one warning instead of stopping with "cannot save checkpoint" about a complete checkpoint."""
from test_freeze_zero2 import tiny_engine


def prune_fails_case(ckpt_dir):
    import deepspeed.comm as dist

    from desmoe import checkpoint

    engine, _ = tiny_engine(ep_size=2)
    checkpoint.save(engine, ckpt_dir, step=1, keep=1)
    real = checkpoint.prune

    def busy(root, step, keep):  # fault injection: what os.replace raises on a busy NFS folder
        raise OSError(16, "Device or resource busy", str(root / checkpoint.tag_for(1)))

    checkpoint.prune = busy
    try:
        checkpoint.save(engine, ckpt_dir, step=2, keep=1)  # raised TrainingFailure on every rank before the fix
    finally:
        checkpoint.prune = real
    dist.barrier()
    return checkpoint.latest_tag(ckpt_dir), sorted(p.name for p in ckpt_dir.glob("step*"))


def test_a_failed_prune_keeps_the_run_and_warns(ranks, tmp_path):
    results = ranks.run(prune_fails_case, tmp_path / "ckpt")
    for latest, tags in results:
        assert latest == "step00000002"
        assert tags == ["step00000001", "step00000002"]  # the older one stays, as the warning says
