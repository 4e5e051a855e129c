"""identifier.calibration_split on a task with fewer training images than train.proto_samples: the config check
counts on proto_samples samples, the run has fewer; a split that then holds out none (or leaves fewer than 2 to
fit) was dropped without a word (the threshold calibrated on the fitting rows). Now refused in one line naming
the task, the keys and the counts."""
import pytest
import torch

from desmoe.errors import UserError
from desmoe.recipes.trge.task_id import IdentifierConfig, TaskInfo, build_identifier, check_calibration


def _feats(n):
    """n distinct unit-scale rows of 4 dims (fixed values: only the row count matters here)."""
    return torch.tensor([[1.0, 0.5 * i, 0.25, -0.1 * i] for i in range(n)])


@pytest.mark.parametrize("backend", ["prototype", "gaussian"])
def test_a_task_too_small_for_the_split_is_refused(backend):
    # proto_samples=20 with split 0.25 passes the config check (5 held out, 15 to fit); the task has 2 images
    ident = build_identifier(IdentifierConfig(backend=backend, threshold=0.0, threshold_quantile=0.05,
                                              calibration_split=0.25))
    with pytest.raises(UserError) as err:
        ident.fit_task(TaskInfo("tiny", ["a", "b"], _feats(2)))
    assert str(err.value) == ("task 'tiny': identifier.calibration_split=0.25 of its 2 identifier samples "
                              "(train.proto_samples capped by its training images) holds out 0 and leaves 2 to fit; "
                              "expected at least 1 held out and 2 to fit (another calibration_split, or more "
                              "training images)")


@pytest.mark.parametrize("backend", ["prototype", "gaussian"])
def test_a_task_large_enough_is_split(backend):
    """8 samples, split 0.25: 2 held out for the quantile, 6 fitted (the split as configured, on what exists)."""
    ident = build_identifier(IdentifierConfig(backend=backend, threshold=0.0, threshold_quantile=0.5,
                                              calibration_split=0.25))
    ident.fit_task(TaskInfo("ok", ["a", "b"], _feats(8)))
    assert check_calibration("ok", 8, 0.25) == 2


def test_no_split_calibrates_on_the_fitting_rows():
    assert check_calibration("any", 1, 0.0) == 0


def test_the_set_up_message_names_proto_samples():
    """The recipe's set-up checks every task before training (not at the first task's end)."""
    with pytest.raises(UserError, match=r"^task 'digits-a': identifier.calibration_split=0.5 of its 3 identifier "
                                        r"samples \(train.proto_samples=200 capped by its training images\) holds "
                                        r"out 2 and leaves 1 to fit;"):
        check_calibration("digits-a", 3, 0.5, 200)


def test_the_run_refuses_it_at_set_up(tmp_path):
    """A real launch on the digit sequence with 3 training images a task (split 0.5: 2 held out, 1 to fit): named
    at set-up, before any training, in one line."""
    import subprocess
    import sys

    from jobs import ROOT, clean_env

    proc = subprocess.run([sys.executable, str(ROOT / "launcher/trge.py"), "--deepspeed", "configs/zero2.json",
                           "--config", "configs/trge_digits.yaml", "data.n_train=3", "groups.ep_size=1",
                           "identifier.threshold=0", "identifier.threshold_quantile=0.05",
                           "identifier.calibration_split=0.5", f"run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env=clean_env(), cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "identifier samples (train.proto_samples=200 capped by its training images) holds out 2 and leaves 1 " \
           "to fit;" in errors[0], errors
    assert not list(tmp_path.rglob("metrics.jsonl"))  # nothing trained
