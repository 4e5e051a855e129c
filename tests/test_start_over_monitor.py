"""A run started over in its run directory (no checkpoint to resume: step 0) redoes everything, step 0
included: the run's config text and a vanilla run's evaluation are logged at step 0.  TensorBoard and
metrics.jsonl must then show the new run's step-0 values only, not both runs' (two configs at one step)."""
from __future__ import annotations

import json
import time

from desmoe.monitor import Monitor, read_metrics, truncate_metrics


def _run(run_dir, config: str, loss: float) -> None:
    truncate_metrics(run_dir, after_step=0)  # what the trainer does before its Monitor, start = 0
    mon = Monitor(run_dir, total_steps=1, initial_step=0)
    mon.text("run/config", config, 0)
    mon.scalars(0, {"val/loss/general": loss})
    mon.scalars(1, {"train/loss": loss + 1})
    mon.close()


def test_a_run_started_over_shows_step_zero_once(tmp_path):
    # the accumulator TensorBoard's own server reads runs with (the legacy one never purges text)
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    run = tmp_path / "run"
    _run(run, "lr: 0.1", 3.0)
    time.sleep(1.1)  # event files are ordered by the second in their name
    _run(run, "lr: 0.01", 2.0)
    assert len(list((run / "tensorboard").iterdir())) == 2
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()

    def shown(tag):
        return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]

    assert shown("val/loss/general") == [(0, 2.0)]
    assert shown("train/loss") == [(1, 3.0)]
    assert shown("run/config/text_summary") == [(0, b"lr: 0.01")]
    assert read_metrics(run) == [{"step": 0, "val/loss/general": 2.0}, {"step": 1, "train/loss": 3.0}]


def test_a_resume_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    rows = [{"step": 0, "val/loss/general": 4.0}, {"step": 2, "train/loss": 3.0}, {"step": 3, "train/loss": 2.5}]
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"note": "by hand"}\n')
    truncate_metrics(run, after_step=2)
    assert read_metrics(run) == rows[:2]
    assert (run / "metrics.jsonl").read_text().endswith('{"note": "by hand"}\n')
