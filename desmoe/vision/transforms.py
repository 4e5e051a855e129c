"""uint8 images -> the normalised pixel tensor a model expects (and cheap train-time augmentation)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from desmoe.errors import UserError


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


def preprocessor_stats(folder: Path, mean, std) -> tuple:
    """The checkpoint's own normalisation (``image_mean``/``image_std`` of ``preprocessor_config.json``, or of
    the ``image_processor`` in ``processor_config.json``), else
    OpenAI CLIP's.  A CLIP trained with other statistics (e.g. 0.5/0.5) was fed OpenAI's: every feature shifted
    without a word.  A file that does not give three numbers for each is refused in one line."""
    import json

    # transformers 5 saves a CLIPProcessor as processor_config.json with the image processor nested inside
    path = next((folder / n for n in ("preprocessor_config.json", "processor_config.json") if (folder / n).is_file()),
                None)
    if path is None:
        return mean, std
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
    if path.name == "processor_config.json":
        spec = spec.get("image_processor") if isinstance(spec, dict) else None
        if spec is None:  # a processor without images: nothing to read
            return mean, std
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a JSON object (an HF image processor config)")
    out = []
    for key, default in (("image_mean", mean), ("image_std", std)):
        v = spec.get(key, default)
        ok = (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
              and (key == "image_mean" or all(x > 0 for x in v)))
        if not ok:
            raise UserError(f"{path}: '{key}' is {v!r}, expected three numbers (one per RGB channel"
                            f"{', each > 0' if key == 'image_std' else ''})")
        out.append(tuple(float(x) for x in v))
    # pixels are always scaled to [0, 1] (uint8 / 255): a checkpoint trained on 0..255 (do_rescale false) or on
    # another scale would be fed pixels off by that factor without a word
    factor = spec.get("rescale_factor", 1 / 255)
    if spec.get("do_rescale") is False or not (isinstance(factor, (int, float)) and abs(factor * 255 - 1) < 1e-6):
        raise UserError(f"{path}: do_rescale={spec.get('do_rescale', True)!r}, rescale_factor={factor!r}; expected "
                        f"pixels scaled by 1/255 (the only scaling this reader applies)")
    if spec.get("do_normalize") is False:  # the model reads the [0, 1] pixels as they are
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out[0], out[1]
