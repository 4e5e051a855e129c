"""Real-MTIL loaders on small fabricated dataset folders (real image files written here)."""
import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

from desmoe.errors import UserError
from desmoe.vision.mtil import ORDER_I, ORDER_II, load_mtil_task


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


def test_imagefolder_split_names_and_undecodable_files(tmp_path):
    classes = ["AnnualCrop", "Forest", "River"]
    for c, name in enumerate(classes):
        for i in range(5):
            _img(tmp_path / "2750" / name / f"{name}_{i}.jpg", (80 * c, 10 * i, 0))
    (tmp_path / "2750" / "Forest" / "broken.jpg").write_bytes(b"not a jpeg")
    task = load_mtil_task("eurosat", tmp_path, size=16)
    assert task.classnames == ["annual crop land", "forest", "river"]
    assert task.templates[0] == "a centered satellite photo of {}."
    assert task.meta["skipped"] == 1  # the broken file, not fatal
    assert task.train_y.numel() + task.test_y.numel() == 15 and task.test_y.numel() == 4  # 80/20 of 16 files
    assert task.train_x.shape[1:] == (16, 16, 3) and task.train_x.dtype == torch.uint8
    # labels follow the folders: class c was drawn with red = 80 * c
    assert torch.equal((task.train_x[:, 0, 0, 0].float() / 80).round().long(), task.train_y)
    again = load_mtil_task("eurosat", tmp_path, size=16)
    assert torch.equal(again.test_y, task.test_y)  # seeded split (seed 42)


def test_official_layouts_food_aircraft_and_zhou_json(tmp_path):
    food = tmp_path / "food"
    (food / "meta").mkdir(parents=True)
    (food / "meta" / "classes.txt").write_text("apple_pie\nbaby_back_ribs\n")
    (food / "meta" / "train.txt").write_text("apple_pie/1\nbaby_back_ribs/2\nbaby_back_ribs/3\n")
    (food / "meta" / "test.txt").write_text("apple_pie/4\n")
    for rel, c in (("apple_pie/1", 0), ("baby_back_ribs/2", 1), ("baby_back_ribs/3", 1), ("apple_pie/4", 0)):
        _img(food / "images" / f"{rel}.jpg", (200 * c, 0, 0))
    task = load_mtil_task("food101", food, size=8)
    assert task.classnames == ["apple pie", "baby back ribs"] and task.train_y.tolist() == [0, 1, 1]
    assert task.test_y.tolist() == [0] and task.prompts()[1] == "a photo of baby back ribs, a type of food."

    air = tmp_path / "aircraft" / "fgvc-aircraft-2013b" / "data"
    air.mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA320\n")
    (air / "images_variant_trainval.txt").write_text("0001 A320\n0002 707-320\n")
    (air / "images_variant_test.txt").write_text("0003 A320\n")
    for i in (1, 2, 3):
        _img(air / "images" / f"000{i}.jpg", (i, i, i))
    task = load_mtil_task("aircraft", tmp_path / "aircraft", size=8)
    assert task.classnames == ["707-320", "A320"] and task.train_y.tolist() == [1, 0] and task.test_y.tolist() == [1]

    flowers = tmp_path / "flowers"
    rows = [[f"image_{i}.jpg", i % 2, ["pink primrose", "globe thistle"][i % 2]] for i in range(4)]
    flowers.mkdir()
    (flowers / "split_zhou_OxfordFlowers.json").write_text(json.dumps({"train": rows[:2], "val": rows[2:3],
                                                                       "test": rows[3:]}))
    for p, lab, _ in rows:
        _img(flowers / "jpg" / p, (lab, 0, 0))
    task = load_mtil_task("flowers", flowers, size=8)
    assert task.classnames == ["pink primrose", "globe thistle"]
    assert task.train_y.tolist() == [0, 1, 0] and task.test_y.tolist() == [1]


def test_mnist_idx_and_caps(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 10)):
        x = np.arange(n * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(n, 28, 28)
        y = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + x.tobytes()))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + y.tobytes()))
    task = load_mtil_task("mnist", tmp_path, size=28, max_train_per_class=2)
    assert task.classnames == [str(i) for i in range(10)] and task.train_y.numel() == 20
    assert torch.bincount(task.train_y).tolist() == [2] * 10 and task.test_x.shape == (10, 28, 28, 3)
    assert torch.equal(task.test_x[3, ..., 0], torch.from_numpy(
        np.arange(10 * 784, dtype=np.uint32).astype(np.uint8).reshape(10, 28, 28)[3]))


def test_bad_folders_one_line(tmp_path):
    (tmp_path / "dtd").mkdir()
    with pytest.raises(UserError, match=r"unknown dataset folder layout for 'dtd'"):
        load_mtil_task("dtd", tmp_path / "dtd")
    (tmp_path / "food" / "meta").mkdir(parents=True)
    (tmp_path / "food" / "meta" / "test.txt").write_text("a/1\n")
    with pytest.raises(UserError, match=r"meta/classes.txt: class-name file missing \(food101 needs"):
        load_mtil_task("food101", tmp_path / "food")
    with pytest.raises(UserError, match="dataset folder not found"):
        load_mtil_task("sun397", tmp_path / "nope")
    with pytest.raises(UserError, match="expected one of aircraft, caltech101"):
        load_mtil_task("imagenet", tmp_path)
    assert sorted(ORDER_II) == sorted(ORDER_I) and ORDER_II[0] == "stanford_cars"
    bad = tmp_path / "pets"
    bad.mkdir()
    (bad / "split_zhou_OxfordPets.json").write_text('{"train": [["a.jpg", 0, "pug"]], "test": [')
    with pytest.raises(UserError, match=r"pets: dataset 'oxford_pets' could not be read \(expected a split_zhou_"
                                        r".*JSONDecodeError"):
        load_mtil_task("oxford_pets", bad)
    (bad / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": [["a.jpg", 0, "pug"], ["b.jpg", 2, "cat"]],
                                                               "test": []}))
    with pytest.raises(UserError, match=r"labels 0..N-1; KeyError"):  # labels 0 and 2: not contiguous
        load_mtil_task("oxford_pets", bad)
    (tmp_path / "cifar" / "cifar-100-python").mkdir(parents=True)
    for f in ("train", "test", "meta"):
        (tmp_path / "cifar" / "cifar-100-python" / f).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"dataset 'cifar100' could not be read \(expected the official python pickles"):
        load_mtil_task("cifar100", tmp_path / "cifar")


def test_odd_class_folders_and_image_modes(tmp_path):
    """train/ + test/ class folders as users make them: nested folders, an empty class, a stray text file,
    upper-case extensions, a unicode class name, grayscale / RGBA / 16-bit PNGs, a symlinked class folder,
    a class only in train and one only in test (no class names for it: left out)."""
    import os

    root = tmp_path / "dtd"

    def save(rel, array, mode=None):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(root / rel)

    for split in ("train", "test"):
        save(f"{split}/bumpy/a.jpg", np.full((10, 10, 3), 10, np.uint8))
        save(f"{split}/bumpy/deeper/b.JPG", np.full((10, 10, 3), 10, np.uint8))
        save(f"{split}/café_crème/a.PNG", np.full((10, 10, 4), 50, np.uint8), "RGBA")
        save(f"{split}/striped/gray.png", np.full((10, 10), 150, np.uint8), "L")
        # a 16-bit PNG of the same grey: PIL's convert("RGB") clipped it to white (255)
        save(f"{split}/striped/gray16.png", np.full((10, 10), 150 * 257, np.uint16))
        (root / split / "striped" / "notes.txt").write_text("not an image")
        (root / split / "empty").mkdir()
    save("train/trainonly/x.jpg", np.full((10, 10, 3), 200, np.uint8))
    save("test/testonly/x.jpg", np.full((10, 10, 3), 220, np.uint8))
    os.symlink(root / "train" / "bumpy", root / "train" / "linked")
    task = load_mtil_task("dtd", root, size=8)
    assert task.classnames == ["bumpy", "café crème", "linked", "striped", "trainonly"]
    assert task.train_y.tolist() == [0, 0, 1, 2, 2, 3, 3, 4] and task.test_y.tolist() == [0, 0, 1, 3, 3]
    assert task.meta["skipped"] == 0
    grey = {3: 150, 0: 10, 1: 50, 2: 10, 4: 200}
    for x, y in ((task.train_x, task.train_y), (task.test_x, task.test_y)):
        assert [int(v) for v in x[:, 4, 4, 0]] == [grey[int(c)] for c in y]  # 16-bit grey is 150, not 255
