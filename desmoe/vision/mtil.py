"""Loaders for the real MTIL datasets (ZSCL's 11) in their usual folder layouts.

    task = load_mtil_task("dtd", "/datasets/dtd", size=224)   # -> ImageTask

The layout is detected from the files present: the official layout of each dataset
(Aircraft variant lists, DTD/Food-101/Pets/SUN397 split files, MNIST IDX, CIFAR
pickles, Flowers/Cars .mat files when scipy is installed), a CoOp ``split_zhou_*.json``,
``train/`` + ``test/`` class folders, or one ImageFolder split 80/20 with seed 42 as
ZSCL does for datasets without an official split (Caltech101, EuroSAT).  Class names
come from the dataset's own files (underscores to spaces; EuroSAT and MNIST take
ZSCL's names); templates follow ZSCL / CLIP per dataset.  Images that fail to
decode are skipped and counted (``task.meta["skipped"]``).
"""
from __future__ import annotations

import gzip
import json
import pickle
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from desmoe.errors import UserError
from desmoe.vision.tasks import ImageTask

ORDER_I = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food101", "mnist", "oxford_pets",
           "stanford_cars", "sun397"]
ORDER_II = [ORDER_I[i] for i in (9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2)]

TEMPLATES = {
    "aircraft": ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."],
    "caltech101": ["a photo of a {}.", "a painting of a {}.", "a plastic {}.", "a sculpture of a {}.",
                   "a sketch of a {}.", "a tattoo of a {}.", "a toy {}.", "a rendition of a {}.",
                   "a embroidered {}.", "a cartoon {}.", "a {} in a video game.", "a plushie {}.",
                   "a origami {}.", "art of a {}.", "graffiti of a {}.", "a drawing of a {}.", "a doodle of a {}.",
                   "a photo of the {}.", "a painting of the {}.", "the plastic {}.", "a sculpture of the {}.",
                   "a sketch of the {}.", "a tattoo of the {}.", "the toy {}.", "a rendition of the {}.",
                   "the embroidered {}.", "the cartoon {}.", "the {} in a video game.", "the plushie {}.",
                   "the origami {}.", "art of the {}.", "graffiti of the {}.", "a drawing of the {}.",
                   "a doodle of the {}."],
    "cifar100": ["a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
                 "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
                 "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
                 "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
                 "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
                 "a photo of the small {}.", "a photo of the big {}."],
    "dtd": ["a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
            "a photo of the {} thing.", "a photo of the {} object."],
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "flowers": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of {}, a type of food."],
    "mnist": ['a photo of the number: "{}".'],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "stanford_cars": ["a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                      "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                      "a photo of my old {}."],
    "sun397": ["a photo of a {}.", "a photo of the {}."],
}
EUROSAT_NAMES = {"AnnualCrop": "annual crop land", "Forest": "forest",
                 "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
                 "Industrial": "industrial buildings or commercial buildings", "Pasture": "pasture land",
                 "PermanentCrop": "permanent crop land", "Residential": "residential buildings or homes or apartments",
                 "River": "river", "SeaLake": "lake or sea"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

Items = list[tuple[Path, int]]


def _clean(name: str) -> str:
    return name.replace("_", " ").strip()


def _need(path: Path, dataset: str, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: class-name file missing ({dataset} needs its {what})")
    return path


def _images_in(folder: Path) -> list[Path]:
    # hidden entries are not the dataset's: macOS's ._x.jpg resource forks (undecodable: counted as skipped) and
    # viewers' .thumbnails/ (decodable: silently added as duplicate images, and shifting the seeded 80/20 split)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))


def _split_80_20(items: Items, seed: int = 42) -> tuple[Items, Items]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = int(0.8 * len(order))
    return [items[i] for i in sorted(order[:cut])], [items[i] for i in sorted(order[cut:])]


# ---------------------------------------------------------------------------- layouts (return classnames, train, test)

def _zhou_json(root: Path, name: str):
    split = sorted(root.glob("split_zhou_*.json"))[0]
    data = json.loads(split.read_text())
    first = data["train"][0][0]
    base = next((d for d in (root, root / "images", root / "jpg", root / "2750", root / "101_ObjectCategories",
                             root / "SUN397") if (d / first).exists()), root)
    names: dict[int, str] = {}
    for part in ("train", "val", "test"):
        for _, label, cname in data.get(part, []):
            names[int(label)] = _clean(cname)
    to_items = lambda rows: [(base / p, int(lab)) for p, lab, _ in rows]  # noqa: E731
    return [names[i] for i in range(len(names))], to_items(data["train"] + data.get("val", [])), to_items(data["test"])


def _train_test_folders(root: Path, name: str):
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    classes = [d.name for d in _class_folders(root / "train")]
    read = lambda d: [(p, classes.index(c.name)) for c in _class_folders(d) if c.name in classes  # noqa: E731
                      for p in _images_in(c)]
    return [_display(name, c) for c in classes], read(root / "train"), read(test_dir)


def _image_folder(root: Path, name: str):
    for sub in ("101_ObjectCategories", "2750", "EuroSAT_RGB", "EuroSAT", "images"):
        if (root / sub).is_dir():
            root = root / sub
            break
    dirs = [d for d in _class_folders(root) if d.name != "BACKGROUND_Google"]
    items = [(p, i) for i, d in enumerate(dirs) for p in _images_in(d)]
    train, test = _split_80_20(items)
    return [_display(name, d.name) for d in dirs], train, test


def _display(dataset: str, folder: str) -> str:
    if dataset == "eurosat":
        return EUROSAT_NAMES.get(folder, _clean(folder))
    return _clean(folder)


def _aircraft(root: Path, name: str):
    data = next(d for d in (root / "data", root / "fgvc-aircraft-2013b" / "data") if d.is_dir())
    classes = [line.strip() for line in _need(data / "variants.txt", name, "data/variants.txt").read_text()
               .splitlines() if line.strip()]

    def read(split):
        rows = [line.split(" ", 1) for line in (data / f"images_variant_{split}.txt").read_text().splitlines() if line]
        return [(data / "images" / f"{img}.jpg", classes.index(var.strip())) for img, var in rows]
    return classes, read("trainval"), read("test")


def _dtd(root: Path, name: str):
    classes = sorted(d.name for d in (root / "images").iterdir() if d.is_dir())
    read = lambda f: [(root / "images" / line.strip(), classes.index(line.split("/")[0]))  # noqa: E731
                      for line in (root / "labels" / f).read_text().splitlines() if line.strip()]
    return [_clean(c) for c in classes], read("train1.txt") + read("val1.txt"), read("test1.txt")


def _food101(root: Path, name: str):
    keys = [c.strip() for c in _need(root / "meta" / "classes.txt", name, "meta/classes.txt").read_text().splitlines()
            if c.strip()]
    read = lambda f: [(root / "images" / f"{line.strip()}.jpg", keys.index(line.split("/")[0]))  # noqa: E731
                      for line in (root / "meta" / f).read_text().splitlines() if line.strip()]
    return [_clean(k) for k in keys], read("train.txt"), read("test.txt")


def _pets(root: Path, name: str):
    ann = root / "annotations"
    names: dict[int, str] = {}

    def read(f):
        out = []
        for line in (ann / f).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                img, cid = line.split()[:2]
                names[int(cid) - 1] = _clean(img.rsplit("_", 1)[0]).lower()
                out.append((root / "images" / f"{img}.jpg", int(cid) - 1))
        return out
    train, test = read("trainval.txt"), read("test.txt")
    return [names[i] for i in range(len(names))], train, test


def _sun397(root: Path, name: str):
    keys = [c.strip() for c in _need(root / "ClassName.txt", name, "ClassName.txt").read_text().splitlines()
            if c.strip()]
    base = root / "SUN397" if (root / "SUN397").is_dir() else root
    read = lambda f: [(base / line.strip().lstrip("/"), keys.index("/" + line.strip().lstrip("/").rsplit("/", 1)[0]))
                      for line in (root / f).read_text().splitlines() if line.strip()]  # noqa: E731
    return [_clean(k.lstrip("/").split("/", 1)[1].replace("/", " ")) for k in keys], \
        read("Training_01.txt"), read("Testing_01.txt")


def _mat_layout(root: Path, name: str):
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError(f"{root}: {name} in its .mat layout needs scipy (pip install scipy), "
                        "or use a CoOp split_zhou_*.json / train+test class folders") from None
    if name == "flowers":
        names = json.loads(_need(root / "cat_to_name.json", name, "cat_to_name.json").read_text())
        labels = loadmat(root / "imagelabels.mat")["labels"][0]
        ids = loadmat(root / "setid.mat")
        item = lambda i: (root / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1]) - 1)  # noqa: E731
        train = [item(int(i)) for k in ("trnid", "valid") for i in ids[k][0]]
        return [names[str(i + 1)] for i in range(len(names))], train, [item(int(i)) for i in ids["tstid"][0]]
    devkit = root / "devkit"
    meta = loadmat(_need(devkit / "cars_meta.mat", name, "devkit/cars_meta.mat"))["class_names"][0]

    def read(mat, folder):
        return [(root / folder / str(a["fname"][0]), int(a["class"][0][0]) - 1)
                for a in loadmat(mat)["annotations"][0]]
    return [str(c[0]) for c in meta], read(devkit / "cars_train_annos.mat", "cars_train"), \
        read(root / "cars_test_annos_withlabels.mat", "cars_test")


def _mnist_arrays(root: Path):
    for d in (root / "MNIST" / "raw", root / "raw", root):
        for ext in ("", ".gz"):
            if (d / f"train-images-idx3-ubyte{ext}").is_file():
                def idx(stem):
                    p = d / f"{stem}{ext}"
                    raw = gzip.open(p).read() if ext else p.read_bytes()
                    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
                    return np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)
                return {s: (idx(f"{p}-images-idx3-ubyte"), idx(f"{p}-labels-idx1-ubyte"))
                        for s, p in (("train", "train"), ("test", "t10k"))}
    return None


def _cifar100_arrays(root: Path):
    d = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    if not (d / "train").is_file():
        return None
    meta = pickle.loads(_need(d / "meta", "cifar100", "meta file").read_bytes(), encoding="bytes")
    out = {}
    for split in ("train", "test"):
        raw = pickle.loads((d / split).read_bytes(), encoding="bytes")
        out[split] = (np.asarray(raw[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
                      np.asarray(raw[b"fine_labels"]))
    return [_clean(n.decode()) for n in meta[b"fine_label_names"]], out


LAYOUTS = {"_zhou_json": "a split_zhou_*.json whose rows are [path, label, classname] with labels 0..N-1",
           "_train_test_folders": "train/ and test/ (or val/) class folders",
           "_image_folder": "one folder of images per class",
           "_mat_layout": "the official .mat label files",
           "_mnist_arrays": "the official idx(.gz) files", "_cifar100_arrays": "the official python pickles"}


def _read(name: str, root: Path, read):
    """Run a layout reader; a malformed user folder ends in one line naming dataset, folder and expectation."""
    try:
        return read()
    except UserError:
        raise
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            pickle.UnpicklingError) as err:
        expected = {"mnist": LAYOUTS["_mnist_arrays"], "cifar100": LAYOUTS["_cifar100_arrays"]}.get(name)
        if expected is None:
            try:
                expected = LAYOUTS.get(detect_layout(name, root).__name__, "its official layout")
            except UserError:
                expected = "its official layout"
        raise UserError(f"{root}: dataset '{name}' could not be read (expected {expected}; "
                        f"{type(err).__name__}: {' '.join(str(err).split())[:160]})") from None


def detect_layout(name: str, root: Path):
    """The reader for the layout found under ``root``; one clear line when none fits."""
    checks = [
        (lambda: any(root.glob("split_zhou_*.json")), _zhou_json),
        (lambda: (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()),
         _train_test_folders),
        (lambda: name == "aircraft" and any((d / "images_variant_test.txt").is_file() for d in
                                            (root / "data", root / "fgvc-aircraft-2013b" / "data")), _aircraft),
        (lambda: name == "dtd" and (root / "labels" / "test1.txt").is_file(), _dtd),
        (lambda: name == "food101" and (root / "meta" / "test.txt").is_file(), _food101),
        (lambda: name == "oxford_pets" and (root / "annotations" / "test.txt").is_file(), _pets),
        (lambda: name == "sun397" and (root / "Testing_01.txt").is_file(), _sun397),
        (lambda: (name == "flowers" and (root / "imagelabels.mat").is_file())
         or (name == "stanford_cars" and (root / "devkit").is_dir()), _mat_layout),
        (lambda: name in ("caltech101", "eurosat") and root.is_dir(), _image_folder),
    ]
    for test, reader in checks:
        if test():
            return reader
    raise UserError(f"{root}: unknown dataset folder layout for '{name}' (expected its official layout, "
                    "a split_zhou_*.json, train/ and test/ class folders, or one class folder per class)")


def _rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB.  PIL's convert("RGB") clips 16-bit grayscale (a 16-bit PNG, mode I;16) at 255, which
    turns almost every pixel white; such images are scaled to 8 bits first (mode I: only when its values
    go beyond 8 bits).  A 32-bit float image (mode F, e.g. a TIFF in [0, 1]) has no one 8-bit reading, and
    convert("RGB") turned [0, 1] into black: it is refused (ValueError: skipped and counted by the MTIL loader,
    named in one line by the image-folder reader)."""
    if img.mode == "F":
        raise ValueError("32-bit float pixels (mode F); expected 8- or 16-bit integer images")
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or a.max() > 255:
            a = a / 257.0  # 65535 -> 255
        img = Image.fromarray(a.round().clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIP's (and so ZSCL's) test transform: the shorter side bicubically to ``size``, then the centre
    ``size`` x ``size`` crop, with torchvision's rounding (Resize: long side int(size * long / short);
    CenterCrop: offset round((L - size) / 2)).  Resizing straight to a square squashed every non-square
    photo (Aircraft, Cars, Food, Pets, SUN397, ...), so no number matched the protocol's."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _decode(items: Items, size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    xs, ys, skipped = [], [], 0
    for path, label in tqdm(items, desc=desc, leave=False):
        try:
            with Image.open(path) as img:
                xs.append(np.asarray(resize_center_crop(_rgb(img), size), dtype=np.uint8))
            ys.append(label)
        except Exception:  # noqa: BLE001 - missing or undecodable file: skip it, count it
            skipped += 1
    x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, size, size, 3, dtype=torch.uint8)
    return x, torch.tensor(ys, dtype=torch.int64), skipped


def _limit(items: Items, n: Optional[int], seed: int) -> Items:
    if n is None:
        return items
    rng = random.Random(seed)
    by: dict[int, list] = {}
    for it in items:
        by.setdefault(it[1], []).append(it)
    return [it for lab in sorted(by) for it in (rng.sample(by[lab], n) if len(by[lab]) > n else by[lab])]


def load_mtil_task(name: str, root: str | Path, size: int = 224, max_train_per_class: Optional[int] = None,
                   max_test_per_class: Optional[int] = None, seed: int = 42) -> ImageTask:
    """One MTIL dataset as an in-memory ImageTask (uint8 at ``size`` px; cap per class to bound memory)."""
    if name not in TEMPLATES:
        raise UserError(f"dataset '{name}': expected one of {', '.join(ORDER_I)}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    arrays = _read(name, root, lambda: _mnist_arrays(root) if name == "mnist"
                   else _cifar100_arrays(root) if name == "cifar100" else None)
    if arrays is not None:
        classes, arrays = ([str(i) for i in range(10)], arrays) if name == "mnist" else arrays
        out, skipped = {}, 0
        for split, cap in (("train", max_train_per_class), ("test", max_test_per_class)):
            x, y = arrays[split]
            keep = [i for i, _ in _limit([(i, int(v)) for i, v in enumerate(y)], cap, seed)]
            x = torch.from_numpy(np.ascontiguousarray(x[keep]))
            x = x.unsqueeze(-1).expand(-1, -1, -1, 3) if x.dim() == 3 else x
            x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2).float(), size=(size, size), mode="bicubic",
                                                align_corners=False).clamp(0, 255).round().to(torch.uint8)
            out[f"{split}_x"], out[f"{split}_y"] = x.permute(0, 2, 3, 1).contiguous(), torch.from_numpy(
                np.asarray(y[keep], dtype=np.int64))
    else:
        reader = detect_layout(name, root)
        classes, train, test = _read(name, root, lambda: reader(root, name))
        tx, ty, s1 = _decode(_limit(train, max_train_per_class, seed), size, f"{name} train")
        vx, vy, s2 = _decode(_limit(test, max_test_per_class, seed), size, f"{name} test")
        out, skipped = dict(train_x=tx, train_y=ty, test_x=vx, test_y=vy), s1 + s2
    return ImageTask(name, classes, TEMPLATES[name], **out, source=str(root), meta={"skipped": skipped})


def load_mtil_sequence(root: str | Path, order: str = "I", **kw) -> list[ImageTask]:
    """All 11 datasets from ``root/<name>/`` in Order I or II."""
    names = {"I": ORDER_I, "II": ORDER_II}.get(order)
    if names is None:
        raise UserError(f"order {order!r}: expected 'I' or 'II'")
    return [load_mtil_task(n, Path(root) / n, **kw) for n in names]
