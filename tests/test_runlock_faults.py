"""The run lock (desmoe/training/runlock.py) on a disk that refuses writes, on 2 real ranks: rank 0 cannot
write the lock's holder line (a real RLIMIT_FSIZE of 0, EFBIG, what a full disk or quota does to the write);
every rank must stop in the same one line naming the run directory, none hang or print a traceback."""
import resource


def take_lock_without_room(run_dir: str) -> str:
    import deepspeed.comm as dist

    from desmoe.errors import UserError
    from desmoe.training.runlock import RunLock

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if dist.get_rank() == 0:  # Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the rank
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, limit[1]))
    try:
        lock = RunLock(run_dir).acquire()
    except UserError as err:
        return str(err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    lock.release()
    return "ok"


def test_a_run_lock_that_cannot_be_written_stops_every_rank_in_one_line(ranks, tmp_path):
    run = tmp_path / "run dir ü"  # spaces and non-ASCII in run.dir are no reason to fail
    got = ranks.run(take_lock_without_room, str(run))
    assert got[0] == got[1] and "\n" not in got[0], got
    assert got[0].startswith(f"{run}: cannot write the run directory") and "File too large" in got[0], got
    # with room again, the same directory is taken: the failed attempt held nothing
    assert ranks.run(_take_lock, str(run)) == ["ok", "ok"]


def _take_lock(run_dir: str) -> str:
    from desmoe.training.runlock import RunLock

    RunLock(run_dir).acquire().release()
    return "ok"
