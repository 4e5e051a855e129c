"""TRGE on the image folders users bring (torchvision's ImageFolder layout, data.sequence=folders): the images
are small PNG/JPEG files written here with PIL, and the pixels and labels that come out are checked against
them; every layout the reader cannot use exactly is refused in one line naming the path."""
import numpy as np
import pytest
import torch
from PIL import Image

from desmoe.errors import UserError
from desmoe.recipes.trge.data import DataConfig, load_sequence

RNG = np.random.default_rng(0)


def _png(path, h=16, w=16, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    array = RNG.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(array, mode if mode != "RGB" else None).save(path)
    return array


def _cfg(root, **kw):
    cfg = DataConfig(sequence="folders", root=str(root), image_size=16, **kw)
    cfg.check()
    return cfg


def test_train_test_folders_give_sorted_classes_exact_pixels_and_upright_photos(tmp_path):
    pics = {}
    for split in ("train", "test"):
        for cls in ("zebra_finch", "Blue jay"):  # sorted by folder name: "Blue jay" first
            pics[split, cls, "b"] = _png(tmp_path / "birds" / split / cls / "b.png")
            pics[split, cls, "a"] = _png(tmp_path / "birds" / split / cls / "nested" / "a.png")
        (tmp_path / "birds" / split / "Blue jay" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped
    # a phone photo: stored landscape, EXIF Orientation 6 (shown rotated 90 degrees clockwise)
    stored = RNG.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "birds" / "test" / "zebra_finch" / "phone.jpg", quality=95, exif=exif)
    (tasks, controls) = load_sequence(_cfg(tmp_path))
    assert controls == [] and [t.name for t in tasks] == ["birds"]
    t = tasks[0]
    assert t.classnames == ["Blue jay", "zebra finch"] and t.templates == ["a photo of a {}."]
    # files sorted by their path inside the class folder: b.png before nested/a.png
    assert t.train_y.tolist() == [0, 0, 1, 1] and t.test_y.tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(t.train_x[0], torch.from_numpy(pics["train", "Blue jay", "b"]))
    assert torch.equal(t.train_x[3], torch.from_numpy(pics["train", "zebra_finch", "a"]))
    with Image.open(tmp_path / "birds" / "test" / "zebra_finch" / "phone.jpg") as img:
        decoded = np.asarray(img.convert("RGB"))  # the JPEG's own pixels, before any orientation
    upright = np.rot90(decoded, k=-1)  # 16 wide x 32 tall; CLIP's centre crop takes rows 8..24
    assert torch.equal(t.test_x[4], torch.from_numpy(np.ascontiguousarray(upright[8:24])))


def test_one_class_tree_is_split_per_class_deterministically(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(10):
            _png(tmp_path / "pets" / cls / f"{i}.png")
    # grey, palette, 16-bit grey and alpha images are read as 8-bit RGB
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "pets" / "cat" / "grey16.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "pets" / "dog" / "alpha.png")
    cfg = _cfg(tmp_path, test_fraction=0.3)
    t = load_sequence(cfg)[0][0]
    assert t.train_y.tolist() == [0] * 8 + [1] * 8 and t.test_y.tolist() == [0] * 3 + [1] * 3  # round(11 * 0.3)
    again = load_sequence(cfg)[0][0]
    assert torch.equal(again.train_x, t.train_x) and torch.equal(again.test_x, t.test_x)
    grey16 = Image.open(tmp_path / "pets" / "cat" / "grey16.png")
    want = torch.full((16, 16, 3), round(40000 / 257), dtype=torch.uint8)  # scaled to 8 bits, not clipped
    where = [x for x in (*t.train_x, *t.test_x) if torch.equal(x, want)]
    assert grey16.mode.startswith("I") and len(where) == 1
    other = load_sequence(_cfg(tmp_path, test_fraction=0.5))[0][0]
    assert other.test_y.numel() == 12 and not torch.equal(other.test_x[:3], t.test_x[:3])


def test_a_symlink_back_up_a_class_folder_is_walked_once(tmp_path):
    for cls in ("x", "y"):
        for split in ("train", "test"):
            _png(tmp_path / "t" / split / cls / "0.png")
    (tmp_path / "t" / "train" / "x" / "loop").symlink_to(tmp_path / "t" / "train" / "x", target_is_directory=True)
    t = load_sequence(_cfg(tmp_path))[0][0]
    assert t.train_y.tolist() == [0, 1]


def test_task_order_comes_from_data_tasks(tmp_path):
    for task in ("a_task", "b_task"):
        for cls in ("x", "y"):
            for split in ("train", "test"):
                _png(tmp_path / task / split / cls / "0.png")
    tasks = load_sequence(_cfg(tmp_path, tasks=["b_task", "a_task"]))[0]
    assert [t.name for t in tasks] == ["b_task", "a_task"]
    with pytest.raises(UserError, match=r"c_task: task folder not found \(have: a_task, b_task\)$"):
        load_sequence(_cfg(tmp_path, tasks=["c_task"]))


def _tree(root, classes=("x", "y"), n=2):
    for cls in classes:
        for i in range(n):
            _png(root / "t" / cls / f"{i}.png")


@pytest.mark.parametrize("make, kw, expect", [
    (lambda r: (r / "t" / "z" / ".hidden").mkdir(parents=True), {"test_fraction": 0.5},
     r"t/z: empty class folder; expected at least one image"),
    (lambda r: (r / "t" / "x" / "notes.txt").write_text("hi"), {"test_fraction": 0.5},
     r"t/x/notes.txt: not an image file; expected only images"),
    (lambda r: (r / "t" / "x" / "broken.jpg").write_bytes(b"not a jpeg"), {"test_fraction": 0.5},
     r"t/x/broken.jpg: not a readable image \("),
    (lambda r: Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(r / "t" / "x" / "float.tif"),
     {"test_fraction": 0.5}, r"t/x/float.tif: not a readable image \(ValueError: 32-bit float pixels \(mode F\)"),
    (lambda r: (r / "t" / "README.md").write_text("hi"), {"test_fraction": 0.5},
     r"t/README.md: a file beside the class folders; expected only class folders"),
    (lambda r: None, {}, r"t: no train/ and test/ folders and no test_fraction; expected one of them"),
    (lambda r: _tree(r, ("X",)), {"test_fraction": 0.5},
     r"t: class folders 'X' and 'x' give the same class name 'x' \(up to case, spaces and underscores\)"),
    (lambda r: _tree(r, ("y_",)), {"test_fraction": 0.5},
     r"t: class folders 'y' and 'y_' give the same class name 'y'"),
    (lambda r: _png(r / "t" / "z" / "0.png"), {"test_fraction": 0.5},
     r"t/z: 1 image\(s\) cannot be split with test_fraction=0.5; expected at least one image in train and in test"),
    (lambda r: _png(r / "t" / "train" / "x" / "0.png"), {"test_fraction": 0.5},
     r"t: has train/ but no test/; expected both"),
])
def test_folders_the_reader_cannot_use_are_refused_in_one_line(tmp_path, make, kw, expect):
    _tree(tmp_path)
    make(tmp_path)
    with pytest.raises(UserError, match=expect) as err:
        load_sequence(_cfg(tmp_path, **kw))
    assert "\n" not in str(err.value)


def test_truncated_jpeg_is_refused_not_skipped(tmp_path):
    _tree(tmp_path, n=2)
    photo = tmp_path / "t" / "x" / "cut.jpg"
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photo, quality=95)
    photo.write_bytes(photo.read_bytes()[:300])
    with pytest.raises(UserError, match=r"t/x/cut.jpg: not a readable image \(OSError"):
        load_sequence(_cfg(tmp_path, test_fraction=0.5))


def test_train_and_test_with_different_classes_and_config_keys_are_refused(tmp_path):
    for split, classes in (("train", ("x", "y")), ("test", ("x", "z"))):
        for cls in classes:
            _png(tmp_path / "t" / split / cls / "0.png")
    with pytest.raises(UserError, match=r"t: class 'y' is in only one of train/ and test/; expected the same"):
        load_sequence(_cfg(tmp_path))
    with pytest.raises(UserError, match=r"t: has train/ and test/ folders and test_fraction=0.5 is set"):
        load_sequence(_cfg(tmp_path, test_fraction=0.5))
    with pytest.raises(Exception, match=r"key 'test_fraction': expected a number in \[0, 1\)"):
        _cfg(tmp_path, test_fraction=1.0)
    with pytest.raises(Exception, match=r"key 'tasks': expected unset with data.sequence=mtil"):
        DataConfig(sequence="mtil", root="x", tasks=["t"]).check()
    with pytest.raises(Exception, match=r"key 'root': expected the folder holding one image folder per task"):
        DataConfig(sequence="folders").check()


def _folders_run(run_dir, root):
    from desmoe.config import load_config
    from desmoe.recipes.trge.recipe import TRGEExperiment, run_trge

    cfg = load_config(TRGEExperiment, "configs/trge_digits.yaml", [
        f"run.dir={run_dir}", "run.name=mine", "data.sequence=folders", f"data.root={root}", "data.test_fraction=0.25",
        "data.n_train=300", "data.n_test=200", "data.image_size=32", "backbone.hidden_size=16",
        "groups.bottleneck=4", "train.steps_per_task=2", "train.micro_batch=4", "train.proto_samples=8"])
    return run_trge(cfg, "configs/zero2.json")


def test_trge_learns_a_folder_sequence_on_two_ranks(ranks, tmp_path):
    """The whole recipe (2 gloo ranks, EP over both) on two user folders: every task is evaluated after each."""
    for task in ("shapes", "tones"):
        for cls in ("dark", "light"):
            for i in range(8):
                path = tmp_path / "mine" / task / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                level = 30 + 10 * i if cls == "dark" else 150 + 10 * i
                Image.fromarray(np.full((20, 24, 3), level, np.uint8)).save(path)
    s = ranks.run(_folders_run, str(tmp_path / "runs"), str(tmp_path / "mine"))[0]
    A = np.array(s["accuracy_matrix"])
    assert A.shape == (2, 2) and np.isfinite(A).all()
