"""uint8 images -> the normalised pixel tensor a model expects (and cheap train-time augmentation)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def to_pixel_values(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or [B, H, W] grey) -> [B, 3, size, size], resized bicubically and normalised."""
    if images.dim() == 3:
        images = images.unsqueeze(-1)
    x = images.to(device).permute(0, 3, 1, 2).to(dtype) / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
    mean_t = torch.tensor(mean, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def random_resized_crop(images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.9, 1.0)
                        ) -> torch.Tensor:
    """Per-image random crop of ``scale`` of the area, resized back (MoE-Adapters' train transform, on uint8)."""
    n, h, w = images.shape[:3]
    out = torch.empty_like(images)
    for i in range(n):
        s = float(torch.empty(1).uniform_(*scale, generator=generator))
        ch, cw = max(1, round(h * s ** 0.5)), max(1, round(w * s ** 0.5))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        crop = images[i, top:top + ch, left:left + cw].permute(2, 0, 1).unsqueeze(0).float()
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0) \
            .round().clamp(0, 255).to(images.dtype)
    return out
