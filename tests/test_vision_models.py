"""The CLIP stand-in (tiny random towers with the real architecture), HF CLIP, zero-shot evaluation."""
import pytest
import torch
from transformers import BertModel

from tolerance import assert_close, module_terms
from desmoe.errors import UserError
from desmoe.models.dual_encoder import (DualEncoder, clip_loss, load_clip, load_dual_encoder, save_dual_encoder,
                                        tiny_clip, tiny_dual_encoder)
from desmoe.vision.tasks import ImageTask
from desmoe.vision.transforms import to_pixel_values
from desmoe.vision.zeroshot import as_features, zero_shot_accuracy


def _task(n=12, classes=("cat", "dog", "car")):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 20, 20, 3), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % len(classes)
    return ImageTask("shapes", list(classes), ["a photo of a {}.", "an icon of {}."], x, y, x.flip(0), y.flip(0))


def test_dual_encoder_surface_matches_clip():
    model, tok = tiny_dual_encoder()
    assert isinstance(model.text_model, BertModel) and len(model.text_model.encoder.layer) == 2
    px = to_pixel_values(torch.zeros(3, 20, 20, 3, dtype=torch.uint8), 32, [0.5] * 3, [0.5] * 3)
    t = tok(["a cat", "a big dog", "x"], padding=True, return_tensors="pt")
    assert model.vision_backbone_features(px).shape == (3, 32)
    assert model.get_image_features(pixel_values=px).shape == (3, 16)
    assert model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).shape == (3, 16)
    # padding must not change a sentence's features
    one = tok(["x"], return_tensors="pt")
    # other sequence lengths may take other kernels
    assert_close(model.get_text_features(**one)[0], model.get_text_features(t["input_ids"], t["attention_mask"])[2],
                 terms=module_terms(model, attention=2 * 2 * t["input_ids"].shape[1]))
    out = model(t["input_ids"], px, t["attention_mask"], return_loss=True)
    assert out.logits_per_image.shape == (3, 3) and torch.isfinite(out.loss)
    # LiT: frozen towers get no gradient, projections and temperature do
    model.freeze_towers()
    model.train()
    assert not model.vision_model.training  # BatchNorm keeps its pretrained statistics
    model(t["input_ids"], px, t["attention_mask"], return_loss=True).loss.backward()
    assert model.visual_projection.weight.grad is not None and model.logit_scale.grad is not None
    assert all(p.grad is None for p in model.text_model.parameters())


def test_clip_loss_prefers_matching_pairs():
    good = torch.eye(4) * 10
    assert clip_loss(good) < clip_loss(torch.zeros(4, 4)) < clip_loss(10 - good)


def test_save_load_round_trip(tmp_path):
    model, tok = tiny_dual_encoder(seed=3)
    folder = save_dual_encoder(model, tok, tmp_path / "enc")
    again, tok2 = load_dual_encoder(folder)
    px = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.get_image_features(px), again.get_image_features(px))
    t, t2 = tok(["a red apple"], return_tensors="pt"), tok2(["a red apple"], return_tensors="pt")
    assert torch.equal(t["input_ids"], t2["input_ids"])
    assert torch.equal(model.get_text_features(**t), again.get_text_features(**t2))
    save_dual_encoder(again, tok2, folder)  # overwrite in place leaves no staging folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_zero_shot_accuracy_agrees_with_forward_logits():
    for model, tok in (tiny_dual_encoder(), tiny_clip()):
        task = _task()
        task.templates = task.templates[:1]
        acc = zero_shot_accuracy(model, tok, task, progress=False)
        t = tok(task.prompts(), padding=True, return_tensors="pt")
        px = to_pixel_values(task.test_x, 32, *(
            (model.config.image_mean, model.config.image_std) if isinstance(model, DualEncoder)
            else ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])))
        with torch.no_grad():
            logits = model(input_ids=t["input_ids"], pixel_values=px, attention_mask=t["attention_mask"]).logits_per_image
        assert acc == pytest.approx((logits.argmax(-1) == task.test_y).float().mean().item())


def test_tiny_clip_features_and_bad_paths(tmp_path):
    model, tok = tiny_clip()
    t = tok(["a cat"], return_tensors="pt")
    assert as_features(model.get_text_features(**t)).shape == (1, 16)
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    again, tok2 = load_clip(tmp_path / "clip")
    px = torch.randn(1, 3, 32, 32)
    assert_close(as_features(again.get_image_features(pixel_values=px)),
                 as_features(model.get_image_features(pixel_values=px)), terms=module_terms(model.vision_model) + 32)
    assert torch.equal(tok2(["a cat"], return_tensors="pt")["input_ids"], t["input_ids"])
    with pytest.raises(UserError, match="not a local CLIP checkpoint folder"):
        load_clip(tmp_path)
    with pytest.raises(UserError, match="not a saved dual encoder"):
        load_dual_encoder(tmp_path)


def test_lit_alignment_learns_pairs_with_frozen_towers():
    from desmoe.vision.align import AlignConfig, tower_features, train_heads

    model, tok = tiny_dual_encoder(seed=1)
    model.freeze_towers()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 24, 24, 3), dtype=torch.uint8, generator=g)
    words = ["apple", "boat", "cat", "drum", "egg", "fox", "gem", "hat", "ink", "jar", "kite", "lamp", "moon",
             "nut", "owl", "pig"]
    captions = [[f"an emoji of {w}.", f"{w}"] for w in words]
    before = {k: v.clone() for k, v in model.text_model.state_dict().items()}
    text_head = model.text_projection.weight.detach().clone()
    cfg = AlignConfig(steps=150, batch_size=16, lr=1e-2, views=2)
    img, txt, ids = tower_features(model, tok, images, captions, cfg)
    assert img.shape == (16, 2, 32) and txt.shape == (32, 32)
    losses = train_heads(model, img, txt, ids, cfg)  # default: only the image head (and scale) move
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert torch.equal(text_head, model.text_projection.weight)
    cfg.train_text_projection = True
    losses = train_heads(model, img, txt, ids, cfg)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert not torch.equal(text_head, model.text_projection.weight)
    assert all(torch.equal(v, model.text_model.state_dict()[k]) for k, v in before.items())
