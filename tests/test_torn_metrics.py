"""metrics.jsonl after a kill mid-append: the torn last line is skipped on read and dropped on resume."""
import json

import pytest

from desmoe.errors import UserError
from desmoe.monitor import read_metrics, truncate_metrics


def _write(tmp_path, tail):
    rows = "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(rows + tail)


def test_torn_last_line_is_skipped_and_dropped(tmp_path):
    _write(tmp_path, '{"step": 4, "train/lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    truncate_metrics(tmp_path, after_step=2)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == \
        [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2)]


def test_corrupt_middle_line_is_one_line_error(tmp_path):
    _write(tmp_path, 'garbage\n{"step": 4}\n')
    with pytest.raises(UserError, match="line 4"):
        read_metrics(tmp_path)


def test_a_row_added_by_hand_is_skipped_and_kept(tmp_path):
    """A note or list written into metrics.jsonl by hand: the readers skip it, a resume's truncation keeps it
    (it crashed both: row["step"] of a list, of a row without a step)."""
    import json

    rows = [{"step": 1, "a": 1.0}, {"note": "lr lowered"}, [1, 2], {"step": 2, "a": 2.0}, {"step": 3, "a": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    truncate_metrics(tmp_path, after_step=2)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:4]
