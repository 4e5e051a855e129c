"""LiT-style alignment of the dual encoder: frozen towers, CLIP InfoNCE on the projection heads.

Because the towers are frozen, their outputs are computed once (several augmented
views per image, every caption) and the heads train on cached features: thousands
of steps take seconds on a CPU.  The augmentations (crop, greyscale, inversion)
widen the image side towards the line-art and white-on-black domains of the task
sequence without using any task image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from desmoe.models.dual_encoder import DualEncoder, clip_loss
from desmoe.vision.transforms import random_resized_crop, to_pixel_values


@dataclass
class AlignConfig:
    steps: int = 100  # 1,911 pairs: longer runs overfit them (docs/vision.md)
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    views: int = 2  # augmented views per image (the first is the plain image)
    train_text_projection: bool = False  # False: the text head keeps its orthogonal init (MiniLM's geometry)
    seed: int = 0


def augment(images: torch.Tensor, view: int, gen: torch.Generator) -> torch.Tensor:
    """View 0: as is.  Others: random crop, and for some images greyscale and/or inversion."""
    if view == 0:
        return images
    x = random_resized_crop(images, gen, scale=(0.6, 1.0))
    n = x.shape[0]
    grey = torch.rand(n, generator=gen) < 0.4
    invert = torch.rand(n, generator=gen) < 0.2
    g = x.float().mean(-1, keepdim=True).expand_as(x).round().to(torch.uint8)
    x = torch.where(grey.view(n, 1, 1, 1), g, x)
    return torch.where(invert.view(n, 1, 1, 1), 255 - x, x)


@torch.no_grad()
def tower_features(model: DualEncoder, tokenizer, images: torch.Tensor, captions: list[list[str]],
                   cfg: AlignConfig, batch_size: int = 128):
    """([N, V, C_img] backbone features, [M, C_txt] text features, caption index lists per image)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    size, mean, std = model.config.image_size, model.config.image_mean, model.config.image_std
    model.eval()
    views = []
    for v in tqdm(range(cfg.views), desc="image views"):
        feats = []
        for i in range(0, images.shape[0], batch_size):
            batch = augment(images[i:i + batch_size], v, gen)
            feats.append(model.vision_backbone_features(to_pixel_values(batch, size, mean, std)))
        views.append(torch.cat(feats))
    unique = sorted({c for caps in captions for c in caps})
    where = {c: i for i, c in enumerate(unique)}
    text = []
    for i in tqdm(range(0, len(unique), batch_size), desc="captions"):
        tok = tokenizer(unique[i:i + batch_size], padding=True, truncation=True,
                        max_length=model.config.max_text_length, return_tensors="pt")
        text.append(model.text_backbone_features(tok["input_ids"], tok["attention_mask"]))
    return torch.stack(views, 1), torch.cat(text), [[where[c] for c in caps] for caps in captions]


def train_heads(model: DualEncoder, img_feats: torch.Tensor, txt_feats: torch.Tensor, caption_ids: list[list[int]],
                cfg: AlignConfig) -> list[float]:
    """Train visual_projection, text_projection and logit_scale on cached tower features."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    params = [model.visual_projection.weight, model.logit_scale]
    if cfg.train_text_projection:
        params.append(model.text_projection.weight)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # torch ends the warm-up at step 0.05 * steps - 1 and divides by its length: at 20 steps that is 0, and
    # --steps 20 died in ZeroDivisionError; a hair less is the zero-step warm-up of every shorter run
    pct_start = 0.05 if 0.05 * cfg.steps != 1 else math.nextafter(0.05, 0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=pct_start)
    n, v = img_feats.shape[:2]
    per_image = max(len(ids) for ids in caption_ids)
    # [N, per_image] caption table (short lists repeat their entries) so sampling is vectorised
    table = torch.tensor([[ids[j % len(ids)] for j in range(per_image)] for ids in caption_ids])
    losses = []
    bar = tqdm(range(cfg.steps), desc="align heads")
    for step in bar:
        idx = torch.randperm(n, generator=gen)[:cfg.batch_size]
        view = torch.randint(0, v, (idx.numel(),), generator=gen)
        cap = table[idx, torch.randint(0, per_image, (idx.numel(),), generator=gen)]
        image = F.normalize(model.visual_projection(img_feats[idx, view]), dim=-1)
        text = F.normalize(model.text_projection(txt_feats[cap]), dim=-1)
        loss = clip_loss(model.logit_scale.exp() * text @ image.t())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP caps the scale at 100
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses
