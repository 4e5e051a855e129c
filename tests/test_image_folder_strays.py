"""A task folder with train/ + test/ holds nothing else: whatever sits beside them would be left out silently."""
import numpy as np
import pytest
from PIL import Image

from desmoe.errors import UserError
from desmoe.vision.folders import load_image_folder_task


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("stray, is_dir", [("sparrow", True), ("val", True), ("labels.csv", False)])
def test_entries_beside_train_and_test_are_refused(tmp_path, stray, is_dir):
    for i, split in enumerate(("train", "test")):
        for j, cls in enumerate(("finch", "jay")):
            _png(tmp_path / "birds" / split / cls / "0.png", 10 * i + j)
    (tmp_path / "birds" / ".DS_Store").write_bytes(b"\0")  # hidden: still skipped
    assert load_image_folder_task(tmp_path / "birds", size=8).train_y.tolist() == [0, 1]
    if is_dir:
        _png(tmp_path / "birds" / stray / "0.png", 99)  # images the task would never see
    else:
        (tmp_path / "birds" / stray).write_text("0.png,finch\n")
    with pytest.raises(UserError, match=rf"birds/{stray}: beside train/ and test/, whose images are the task's; "
                                        r"expected only those two folders") as err:
        load_image_folder_task(tmp_path / "birds", size=8)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layout", ["split", "fraction"])
def test_one_file_reached_twice_through_a_symlink_is_refused(tmp_path, layout):
    splits = ("train", "test") if layout == "split" else ("",)
    for i, split in enumerate(splits):
        for j, cls in enumerate(("finch", "jay")):
            for k in range(2):
                _png(tmp_path / "birds" / split / cls / f"{k}.png", 100 * i + 10 * j + k)
    kw = {} if layout == "split" else {"test_fraction": 0.5}
    load_image_folder_task(tmp_path / "birds", size=8, **kw)  # distinct files: fine
    # a jay photo linked into the finch folder: one image under two labels (and maybe in train and test)
    jay = tmp_path / "birds" / splits[-1] / "jay" / "0.png"
    (tmp_path / "birds" / splits[0] / "finch" / "2.png").symlink_to(jay)
    with pytest.raises(UserError, match=r"finch/2.png: the same file as .*jay/0.png \(a symlink\); expected each "
                                        r"image once in") as err:
        load_image_folder_task(tmp_path / "birds", size=8, **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("n, fraction, n_test", [(90, 0.35, 32), (45, 0.7, 32), (10, 0.25, 3), (10, 0.35, 4)])
def test_test_fraction_rounds_half_up_of_the_fraction_as_written(tmp_path, n, fraction, n_test):
    # 90 * 0.35 is 31.5 as written, 31.499999999999996 in floats: half up must give 32
    for cls in ("c", "d"):
        (tmp_path / "t" / cls).mkdir(parents=True)
        for k in range(n):
            (tmp_path / "t" / cls / f"{k}.png").write_bytes(b"")  # read_layout only lists files; no decoding
    from desmoe.vision.folders import read_layout

    _, train, test = read_layout(tmp_path / "t", test_fraction=fraction)
    assert [sum(lab == c for _, lab in test) for c in (0, 1)] == [n_test, n_test]
    assert len(train) + len(test) == 2 * n


def test_class_folders_equal_up_to_unicode_normalisation_are_refused(tmp_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # both "café"; a Mac writes names decomposed
    for j, cls in enumerate((composed, "tea")):
        for k in range(2):
            _png(tmp_path / "drinks" / cls / f"{k}.png", 10 * j + k)
    load_image_folder_task(tmp_path / "drinks", size=8, test_fraction=0.5)
    for k in range(2):
        _png(tmp_path / "drinks" / decomposed / f"{k}.png", 50 + k)
    with pytest.raises(UserError, match=r"drinks: class folders '.*' and '.*' give the same class name") as err:
        load_image_folder_task(tmp_path / "drinks", size=8, test_fraction=0.5)
    assert "\n" not in str(err.value)
