"""A rebuild of an image task folder killed half-way leaves a folder that is refused, not a mix of two builds."""
from pathlib import Path

import pytest
import torch

from desmoe.errors import UserError
from desmoe.vision.tasks import load_task_sequence

CACHE = Path(__file__).resolve().parents[1] / "cache" / "sources"  # git-ignored; shared with data_prep.images


def test_rebuild_killed_after_one_task_is_not_read_as_a_built_folder(tmp_path, monkeypatch):
    import data_prep.images as images

    out = tmp_path / "tiny"
    images.build("tiny", out, CACHE, seed=0)
    before = load_task_sequence(out)
    real_save = images.save_task

    def save_then_die(folder, task):  # the process killed just after the first new task file is in place
        real_save(folder, task)
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "save_task", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        images.build("tiny", out, CACHE, seed=1)  # another seed: same shapes, so the same file sizes
    # before the fix: the seed-0 index and manifest over a seed-1 mnist.npz, loaded as a seed-0 folder
    with pytest.raises(UserError, match=r"tiny: not an image task sequence \(tasks.json missing\)"):
        load_task_sequence(out)
    monkeypatch.undo()
    images.build("tiny", out, CACHE, seed=0)  # the rerun rebuilds: nothing of the partial build is reused
    again = load_task_sequence(out)
    assert all(torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y) for a, b in zip(before, again))
