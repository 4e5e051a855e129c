"""Zero-shot classification: class-name prompts -> text features -> cosine with image features.

Works for the DualEncoder and for an HF CLIPModel (anything with ``get_image_features``,
``get_text_features`` and a tokenizer).  Each class's text feature is the normalised
mean of its normalised template features (CLIP's prompt ensemble).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from desmoe.errors import UserError
from desmoe.models.dual_encoder import DualEncoder, image_spec
from desmoe.vision.tasks import ImageTask
from desmoe.vision.transforms import preprocessor_stats, to_pixel_values


def as_features(out: Any) -> torch.Tensor:
    """A feature tensor from ``get_*_features`` (some transformers versions wrap it in an output object)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "text_embeds", "image_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot read features from {type(out).__name__}")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pixel_spec(model) -> tuple[int, Sequence[float], Sequence[float]]:
    """(size, mean, std) the model was trained with.  An HF CLIPModel read from a folder normalises with that
    folder's preprocessor config (as TRGE's backbones do); OpenAI CLIP's fixed statistics, used before, shifted
    every feature of a CLIP trained with others (e.g. 0.5/0.5) without a word."""
    size, mean, std = image_spec(model)
    folder = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not isinstance(model, DualEncoder) and folder:
        if not Path(folder).is_dir():  # moved, or relative to another directory: its statistics are unknown
            raise UserError(f"{folder}: the folder this {type(model).__name__} was read from is not there; "
                            f"expected it, for its preprocessor_config.json (pixel mean and std)")
        mean, std = preprocessor_stats(Path(folder), mean, std)
    return size, mean, std


@torch.no_grad()
def class_text_features(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256, max_length: int = 32) -> torch.Tensor:
    """[C, D] normalised class embeddings (template ensemble)."""
    device = model_device(model)
    prompts = [t.format(c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out = model.get_text_features(input_ids=tok["input_ids"].to(device),
                                      attention_mask=tok["attention_mask"].to(device))
        feats.append(F.normalize(as_features(out).float(), dim=-1))
    per_prompt = torch.cat(feats).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(1), dim=-1)


@torch.no_grad()
def image_features(model, images: torch.Tensor, batch_size: int = 128, progress: Optional[str] = None
                   ) -> torch.Tensor:
    """[N, D] normalised image embeddings of uint8 [N, H, W, 3] images."""
    device = model_device(model)
    size, mean, std = pixel_spec(model)
    feats = []
    starts = range(0, images.shape[0], batch_size)
    for i in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        pixels = to_pixel_values(images[i:i + batch_size], size, mean, std, device=device,
                                 dtype=next(model.parameters()).dtype)
        feats.append(F.normalize(as_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1))
    return torch.cat(feats) if feats else torch.empty(0)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, task: ImageTask, split: str = "test", batch_size: int = 128,
                       templates: Optional[Sequence[str]] = None, progress: bool = True) -> float:
    """Top-1 accuracy (in [0, 1]) of zero-shot classification over the task's own class names."""
    was_training = model.training
    model.eval()
    try:
        images, labels = (task.test_x, task.test_y) if split == "test" else (task.train_x, task.train_y)
        text = class_text_features(model, tokenizer, task.classnames, templates or task.templates)
        img = image_features(model, images, batch_size, progress=f"zero-shot {task.name}" if progress else None)
        pred = (img @ text.t()).argmax(-1).cpu()
        return float((pred == labels).float().mean()) if labels.numel() else float("nan")
    finally:
        model.train(was_training)
