"""A CLIP-style dual encoder built from two real pretrained towers (the offline CLIP stand-in).

No package on any registry ships CLIP weights, so the embedded default is LiT-style:
an ImageNet EfficientNet-Lite0 image tower and the all-MiniLM-L6-v2 sentence encoder
(an HF ``BertModel``), each followed by a linear projection into a shared space and
aligned with CLIP's InfoNCE loss while the towers stay frozen.  The surface matches
HF ``CLIPModel`` where TRGE needs it:

    get_image_features(pixel_values)              -> [B, D]   (not normalised, like CLIP)
    get_text_features(input_ids, attention_mask)  -> [B, D]
    logit_scale                                    (a parameter holding log(scale))
    vision_backbone_features(pixel_values)        -> [B, 1280] pooled CNN features
    text_model                                     the BertModel (adapters go in its encoder layers)

``load_dual_encoder(folder)`` reads a saved model (safetensors + config + tokenizer);
``load_clip(folder)`` reads a real HF CLIPModel from a local path; ``tiny_dual_encoder``
and ``tiny_clip`` build small random models for shape tests.  Alignment lives in
``desmoe/vision/align.py`` and ``launcher/align_dual_encoder.py``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from desmoe import integrity
from desmoe.checkpoint import replace_dir_atomic
from desmoe.errors import UserError
from desmoe.models.efficientnet_lite import EfficientNetLite, EfficientNetLiteConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class DualEncoderConfig:
    vision: dict = field(default_factory=lambda: dataclasses.asdict(EfficientNetLiteConfig()))
    text: dict = field(default_factory=dict)  # a BertConfig as a dict
    embed_dim: int = 256
    image_size: int = 96  # tasks are cached at 64 px; 96 keeps a 3x3 final CNN map at a third of 224's cost
    image_mean: list = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list = field(default_factory=lambda: list(IMAGENET_STD))
    max_text_length: int = 32
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature


@dataclass
class DualEncoderOutput:
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    loss: Optional[torch.Tensor] = None


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (CLIP's loss)."""
    target = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.t(), target)) / 2


class DualEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = config
        self.vision_model = EfficientNetLite(EfficientNetLiteConfig(**config.vision))
        self.text_model = BertModel(BertConfig(**config.text), add_pooling_layer=False)
        self.visual_projection = nn.Linear(self.vision_model.config.head_channels, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text_model.config.hidden_size, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    def train(self, mode: bool = True) -> "DualEncoder":
        # The CNN's BatchNorm keeps its ImageNet statistics even when the rest trains:
        # small continual-learning batches of one domain would otherwise overwrite them.
        super().train(mode)
        self.vision_model.eval()
        return self

    def vision_backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_backbone_features(pixel_values))

    def text_backbone_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                               ) -> torch.Tensor:
        """Mean of the last hidden states over real tokens (how all-MiniLM-L6-v2 was trained)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
        return self.text_projection(self.text_backbone_features(input_ids, attention_mask))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, return_loss: bool = False) -> DualEncoderOutput:
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_text = self.logit_scale.exp() * text @ image.t()
        loss = clip_loss(logits_per_text) if return_loss else None
        return DualEncoderOutput(logits_per_text.t(), logits_per_text, image, text, loss)

    def freeze_towers(self) -> None:
        """LiT-style: only the projections and the temperature train."""
        for p in [*self.vision_model.parameters(), *self.text_model.parameters()]:
            p.requires_grad_(False)


# ---------------------------------------------------------------------------- building and loading

def from_pretrained_towers(effnet_state_dict: str | Path, minilm_dir: str | Path, embed_dim: int = 256,
                           image_size: int = 96, seed: int = 0):
    """(DualEncoder, tokenizer) from the EfficientNet-Lite0 ``.pth`` and the all-MiniLM-L6-v2 folder;
    the projections are random (seeded) until aligned."""
    from transformers import AutoTokenizer, BertConfig

    minilm_dir = Path(minilm_dir)
    if not (minilm_dir / "config.json").is_file():
        raise UserError(f"{minilm_dir}: not a text-encoder folder (config.json missing)")
    text_cfg = BertConfig.from_pretrained(minilm_dir, local_files_only=True).to_dict()
    torch.manual_seed(seed)
    model = DualEncoder(DualEncoderConfig(text=_bert_fields(text_cfg), embed_dim=embed_dim, image_size=image_size))
    # orthogonal rows keep the sentence encoder's cosine geometry when the text head stays frozen
    nn.init.orthogonal_(model.text_projection.weight)
    state = torch.load(effnet_state_dict, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # ImageNet classifier: unused
    missing, unexpected = model.vision_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{effnet_state_dict}: not an EfficientNet-Lite0 state dict "
                        f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    from safetensors.torch import load_file

    text_state = {k.removeprefix("bert."): v for k, v in load_file(minilm_dir / "model.safetensors").items()}
    text_state = {k: v for k, v in text_state.items()
                  if not k.startswith("pooler.") and not k.endswith("position_ids")}  # buffers, not weights
    missing, unexpected = model.text_model.load_state_dict(text_state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"{minilm_dir}: not a BERT checkpoint (missing {missing[:2]}, unexpected {unexpected[:2]})")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    return model, tokenizer


def _bert_fields(cfg: dict) -> dict:
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")
    return {k: cfg[k] for k in keep if k in cfg}


def save_dual_encoder(model: DualEncoder, tokenizer, folder: str | Path, extra: Optional[dict] = None) -> Path:
    """Atomic: the folder holds a complete model (config.json, model.safetensors, tokenizer) or nothing new."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(
            {"model_type": "desmoe_dual_encoder", **dataclasses.asdict(model.config), **(extra or {})}, indent=1))
        tokenizer.save_pretrained(tmp / "tokenizer")
        replace_dir_atomic(tmp, folder, seal=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_dual_encoder(folder: str | Path, device: str | torch.device = "cpu"):
    """(DualEncoder in eval mode, tokenizer) from a folder written by :func:`save_dual_encoder`."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    folder = Path(folder)
    cfg_path = folder / "config.json"
    # tokenizer/ too: a copy without it (no manifest to catch that) died in transformers' hub-id traceback
    if not cfg_path.is_file() or not (folder / "model.safetensors").is_file() or not (folder / "tokenizer").is_dir():
        raise UserError(f"{folder}: not a saved dual encoder (expected config.json, model.safetensors and "
                        "tokenizer/); build one with `python launcher/align_dual_encoder.py`")
    integrity.verify(folder, "dual encoder folder")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") != "desmoe_dual_encoder":
        raise UserError(f"{cfg_path}: key 'model_type': expected 'desmoe_dual_encoder', got {raw.get('model_type')!r}")
    names = {f.name for f in dataclasses.fields(DualEncoderConfig)}
    model = DualEncoder(DualEncoderConfig(**{k: v for k, v in raw.items() if k in names}))
    try:
        model.load_state_dict(load_file(folder / "model.safetensors"))
    except Exception as err:  # noqa: BLE001 - wrong shapes/keys or a corrupt file are the user's folder
        raise UserError(f"{folder / 'model.safetensors'}: does not match {cfg_path} "
                        f"({' '.join(str(err).split())[:200]}); rebuild it with "
                        "`python launcher/align_dual_encoder.py`") from None
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return model.to(device).eval(), tokenizer


def load_clip(path: str | Path, device: str | torch.device = "cpu"):
    """(HF CLIPModel in eval mode, tokenizer) from a local checkpoint folder; never touches the hub."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a local CLIP checkpoint folder (config.json missing)")
    integrity.verify(path, "model folder")
    # float32: transformers loads a bf16/fp16 folder in its stored dtype, and the fp32 adapters then meet bf16
    # activations (a dtype error deep in the first step); the upcast is exact, and the run's precision is the
    # DeepSpeed config's, as for every other backbone
    # mismatched shapes are collected (not raised: transformers' error only points at a table printed above)
    # and refused below in one line naming a weight and both shapes
    model, info = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                            output_loading_info=True, ignore_mismatched_sizes=True)
    bad = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if bad:
        key, stored, expected = bad[0]
        raise UserError(f"{path}: weight {key} is {list(stored)} in the checkpoint but config.json makes it "
                        f"{list(expected)} ({len(bad)} weight(s) disagree, e.g. projection_dim or image_size); "
                        f"expected the config.json saved with these weights")
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers fills them with random values and only prints a table: silent wrong numbers
        raise UserError(f"{path}: {len(missing)} CLIPModel weight(s) missing from the checkpoint "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); expected a complete CLIPModel")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------- tiny random models (tests)

def tiny_tokenizer(max_length: int = 32):
    """A character-level WordPiece tokenizer (BERT conventions) that needs no files."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,:'\"-!?()&")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars,
                                          *[f"##{c}" for c in chars]])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def tiny_dual_encoder(seed: int = 0, embed_dim: int = 16, image_size: int = 32):
    """(random DualEncoder, tokenizer) with the real architecture at toy width, for shape tests."""
    tokenizer = tiny_tokenizer()
    vision = dataclasses.asdict(EfficientNetLiteConfig(
        stages=[[1, 3, 1, 8, 8, 1], [4, 3, 2, 8, 16, 1], [4, 5, 2, 16, 24, 2]], stem_channels=8, head_channels=32))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = DualEncoder(DualEncoderConfig(vision=vision, text=text, embed_dim=embed_dim, image_size=image_size))
    return model.eval(), tokenizer


def tiny_clip(seed: int = 0, image_size: int = 32):
    """(random HF CLIPModel, tokenizer) from a tiny CLIPConfig, for shape tests."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.sep_token_id,
                bos_token_id=tokenizer.cls_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model.eval(), tokenizer


def image_spec(model: Any) -> tuple[int, list, list]:
    """(input size, mean, std) a model expects: DualEncoder or HF CLIPModel."""
    if isinstance(model, DualEncoder):
        return model.config.image_size, model.config.image_mean, model.config.image_std
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    if vision is None:
        raise UserError(f"{type(model).__name__}: not a DualEncoder or CLIPModel (no vision_config)")
    return vision.image_size, CLIP_MEAN, CLIP_STD


if __name__ == "__main__":
    raise SystemExit("align with: python launcher/align_dual_encoder.py --help")
