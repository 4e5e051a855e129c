"""Image tasks from the folders users bring: torchvision's ImageFolder layout, one task per folder.

    task = load_image_folder_task("photos/birds", size=224, test_fraction=0.2)   # -> ImageTask
    tasks = load_image_folder_sequence("photos", ["birds", "cars"], size=224)

A task folder is either ``<task>/<class>/<images>`` (split per class with ``test_fraction``,
seeded) or ``<task>/train/<class>/<images>`` + ``<task>/test/<class>/<images>``.  A class name
is its folder's name with underscores as spaces; classes and files are read in sorted order,
images inside nested folders of a class belong to it, and hidden entries (``.DS_Store``,
``._x.jpg``, ``.thumbnails/``) are skipped.  Each image is decoded upright (its EXIF
orientation applied, as a photo viewer shows it), as 8-bit RGB (grey, palette, CMYK and
16-bit images converted; alpha dropped and an animated image's first frame read, as
torchvision's loader does), then CLIP's test transform (shorter side to ``size``, centre crop).
Anything else is refused in one line naming the path: a file that is not a readable image,
an empty class folder, a stray file beside the class folders (or beside train/ + test/), two class folders whose names
agree up to case, spaces and underscores, a split left undecided.
"""
from __future__ import annotations

import random
import unicodedata
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from desmoe.errors import UserError
from desmoe.vision.mtil import IMAGE_EXT, _limit, _rgb, resize_center_crop
from desmoe.vision.tasks import ImageTask

TEMPLATES = ["a photo of a {}."]

Items = list[tuple[Path, int]]


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _class_folders(folder: Path) -> list[Path]:
    entries = _visible(folder)
    stray = next((p for p in entries if not p.is_dir()), None)
    if stray is not None:
        raise UserError(f"{stray}: a file beside the class folders; expected only class folders in {folder} "
                        f"(<class name>/<image files>)")
    if not entries:
        raise UserError(f"{folder}: no class folders; expected <class name>/<image files> inside")
    return entries


def _images(cls: Path) -> list[Path]:
    out, todo, seen = [], [cls], {cls.resolve()}
    while todo:  # nested folders belong to the class; hidden ones (.thumbnails/) and dotfiles are skipped
        for p in _visible(todo.pop()):
            if p.is_dir():
                if p.resolve() not in seen:  # a symlink back up the tree would be walked forever
                    seen.add(p.resolve())
                    todo.append(p)
            elif p.suffix.lower() in IMAGE_EXT:
                out.append(p)
            else:  # a caption, a .txt or a .heic would be dropped without a word
                raise UserError(f"{p}: not an image file; expected only images ({', '.join(sorted(IMAGE_EXT))}) "
                                f"in class folder {cls}")
    if not out:
        raise UserError(f"{cls}: empty class folder; expected at least one image (or remove the folder)")
    return sorted(out)


def class_name(folder: str) -> str:
    return " ".join(folder.replace("_", " ").split())


def _classes(folder: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """(class names, {folder name: image paths}); names that collide after normalisation are refused."""
    dirs = _class_folders(folder)
    seen: dict[str, str] = {}
    for d in dirs:
        # one prompt for both: argmax always picks the first (a name copied from a Mac is decomposed, NFD: café
        # as e + U+0301, beside the composed é of one typed here -- two folders, one word to a tokenizer)
        key = unicodedata.normalize("NFC", class_name(d.name)).casefold()
        if key in seen:
            raise UserError(f"{folder}: class folders '{seen[key]}' and '{d.name}' give the same class name "
                            f"'{class_name(d.name)}' (up to case, spaces and underscores); expected distinct names")
        seen[key] = d.name
    return [class_name(d.name) for d in dirs], {d.name: _images(d) for d in dirs}


def _split(files: dict[str, list[Path]], test_fraction: float, seed: int, root: Path) -> tuple[Items, Items]:
    """Per class, a seeded shuffle; its first n * test_fraction images (rounded half up) are the test set."""
    rng = random.Random(seed)
    train, test = [], []
    for label, (name, paths) in enumerate(files.items()):
        order = list(paths)
        rng.shuffle(order)
        # half up (round() goes to even: 5.5 -> 6, 4.5 -> 4) of the fraction as written: in floats 90 * 0.35 is
        # 31.499999999999996 and 31 images went to test where the rule gives 32
        n_test = int(Fraction(str(float(test_fraction))) * len(order) + Fraction(1, 2))
        if not 0 < n_test < len(order):
            raise UserError(f"{root / name}: {len(order)} image(s) cannot be split with test_fraction="
                            f"{test_fraction}; expected at least one image in train and in test for every class")
        test += [(p, label) for p in sorted(order[:n_test])]
        train += [(p, label) for p in sorted(order[n_test:])]
    return train, test


def read_layout(root: Path, test_fraction: float = 0.0, seed: int = 42) -> tuple[list[str], Items, Items]:
    """(class names, train items, test items) of one task folder."""
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    has = [s for s in ("train", "test") if (root / s).is_dir()]
    if has == ["train", "test"]:
        if test_fraction:
            raise UserError(f"{root}: has train/ and test/ folders and test_fraction={test_fraction} is set; "
                            f"expected one split rule (test_fraction 0 uses the folders)")
        # anything else here (a class folder of a half-done reorganisation, a val/ split) was left out without a word
        other = next((p for p in _visible(root) if p.name not in ("train", "test")), None)
        if other is not None:
            raise UserError(f"{other}: beside train/ and test/, whose images are the task's; expected only those two "
                            f"folders in {root} (move it into them, or out of the task folder)")
        names, train = _classes(root / "train")
        other, test = _classes(root / "test")
        if other != names:  # labels are positions: two different class lists would pair images with wrong names
            diff = sorted(set(names) ^ set(other))[0]
            raise UserError(f"{root}: class '{diff}' is in only one of train/ and test/; expected the same class "
                            f"folders in both")
        as_items = lambda files: [(p, i) for i, ps in enumerate(files.values()) for p in ps]  # noqa: E731
        return _once(root, names, as_items(train), as_items(test))
    if has:
        raise UserError(f"{root}: has {has[0]}/ but no {'test' if has[0] == 'train' else 'train'}/; expected both "
                        f"(or class folders only, split with test_fraction)")
    if not test_fraction:
        raise UserError(f"{root}: no train/ and test/ folders and no test_fraction; expected one of them to say "
                        f"which images are test images")
    names, files = _classes(root)
    return _once(root, names, *_split(files, test_fraction, seed, root))


def _once(root: Path, names: list[str], train: Items, test: Items) -> tuple[list[str], Items, Items]:
    """Refuse one file reached twice (a symlink to an image of another class, or beside itself): it would be
    one image under two labels, or in both train and test, and counted twice."""
    where: dict[Path, Path] = {}
    for path, _ in train + test:
        real = path.resolve()
        if real in where:
            link, first = (where[real], path) if where[real].is_symlink() else (path, where[real])  # name the link
            raise UserError(f"{link}: the same file as {first} (a symlink); expected each image once in {root}")
        where[real] = path
    return names, train, test


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: a phone stores a portrait photo landscape with an EXIF Orientation tag
    (a camera may mirror it too), which PIL does not apply on its own -- such a photo was learnt lying down.
    (The MTIL benchmarks keep torchvision's loader, which ignores the tag, so their numbers stay ZSCL's.)"""
    return ImageOps.exif_transpose(img)


def decode(items: Items, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, size, size, 3] upright RGB and int64 labels; an unreadable file is refused, not skipped."""
    xs = []
    for path, _ in items:
        try:
            with Image.open(path) as img:
                xs.append(np.asarray(resize_center_crop(_rgb(upright(img)), size), dtype=np.uint8))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # truncated, not an image
            raise UserError(f"{path}: not a readable image ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:120]})") from None
    x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, size, size, 3, dtype=torch.uint8)
    return x, torch.tensor([lab for _, lab in items], dtype=torch.int64)


def load_image_folder_task(root: str | Path, name: Optional[str] = None, size: int = 224,
                           test_fraction: float = 0.0, seed: int = 42, max_train_per_class: Optional[int] = None,
                           max_test_per_class: Optional[int] = None) -> ImageTask:
    root = Path(root)
    if not 0 <= test_fraction < 1:
        raise UserError(f"test_fraction {test_fraction}: expected a number in [0, 1) (0: use train/ and test/)")
    names, train, test = read_layout(root, test_fraction, seed)
    tx, ty = decode(_limit(train, max_train_per_class, seed), size)
    vx, vy = decode(_limit(test, max_test_per_class, seed), size)
    return ImageTask(name or root.name, names, list(TEMPLATES), tx, ty, vx, vy, source=str(root),
                     meta={"skipped": 0})


def load_image_folder_sequence(root: str | Path, names: Optional[list[str]] = None, **kw) -> list[ImageTask]:
    """One task per folder of ``root``, in the order of ``names`` (default: sorted folder names)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    if not names:
        dirs = _visible(root)
        stray = next((p for p in dirs if not p.is_dir()), None)
        if stray is not None:
            raise UserError(f"{stray}: a file beside the task folders; expected only task folders in {root}")
        names = [d.name for d in dirs]
    if not names:
        raise UserError(f"{root}: no task folders; expected <task>/<class name>/<image files> inside")
    missing = next((n for n in names if not (root / n).is_dir()), None)
    if missing is not None:
        raise UserError(f"{root / missing}: task folder not found (have: {', '.join(p.name for p in _visible(root))})")
    if len(set(names)) != len(names):
        raise UserError(f"task '{next(n for n in names if names.count(n) > 1)}' listed twice; expected each once")
    return [load_image_folder_task(root / n, n, **kw) for n in names]
