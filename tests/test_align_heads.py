"""LiT head training (desmoe/vision/align.py) at step counts the launcher accepts."""
import math

import pytest
import torch

from desmoe.models.dual_encoder import tiny_dual_encoder
from desmoe.vision.align import AlignConfig, tower_features, train_heads


def _features(cfg):
    model, tok = tiny_dual_encoder(seed=1)
    model.freeze_towers()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 24, 24, 3), dtype=torch.uint8, generator=g)  # shape test: random pixels
    captions = [[f"an emoji of {w}."] for w in ("apple", "boat", "cat", "drum", "egg", "fox", "gem", "hat")]
    return model, tower_features(model, tok, images, captions, cfg)


@pytest.mark.parametrize("steps", [19, 20, 21])
def test_every_step_count_trains(steps):
    # torch's OneCycleLR divided by a zero-length warm-up at exactly 20 steps (0.05 * 20 - 1 == 0)
    cfg = AlignConfig(steps=steps, batch_size=8, views=1)
    model, (img, txt, ids) = _features(cfg)
    losses = train_heads(model, img, txt, ids, cfg)
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
