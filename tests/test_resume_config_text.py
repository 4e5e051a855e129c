"""The run's config text in TensorBoard after two resumes from one checkpoint: it was logged at the checkpoint's
step, which a later resume does not purge (it purges from the step after), so TensorBoard kept one config text per
start there, different ones after the lower train.lr a non-finite loss asks for.  Logged at the first step a start
runs, a later resume from the same checkpoint supersedes it."""
import time

from test_run_faults import run_case


def test_two_resumes_from_one_checkpoint_show_one_config(ranks, tmp_path):
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    assert ranks.run(run_case, str(tmp_path), 6, "crash", 5) == ["crash", "crash"]  # checkpoint: step 4
    time.sleep(1.1)  # event files are ordered by the second in their name
    assert ranks.run(run_case, str(tmp_path), 6, "crash", 5) == ["crash", "crash"]  # resumed at 4, crashed again
    time.sleep(1.1)
    assert ranks.run(run_case, str(tmp_path), 6) == ["ok", "ok"]
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    steps = [e.step for e in acc.Tensors("run/config/text_summary")]
    assert steps == [1, 5], steps  # the first start's, and the last resume's (the second one's was purged)
