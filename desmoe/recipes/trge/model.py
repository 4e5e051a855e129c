"""A dual encoder (HF CLIPModel or the embedded stand-in) with expert groups.

The base model is frozen (``requires_grad=False``); only the groups and their
gates train.  Both towers read their group weights from a :class:`GroupContext`;
``None`` there means the frozen model, so one module yields both the frozen
features f0 (prototypes, identification, zero-shot logits) and the adapted ones.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.recipes.trge.adapters import FeatureAdapters, adapt_bert_encoder, adapt_clip_encoder
from desmoe.recipes.trge.groups import GroupSpec
from desmoe.recipes.trge.intra_group import GroupContext


@dataclass
class Placement:
    towers: list[str] = field(default_factory=lambda: ["image", "text"])  # which towers get groups
    layers: list[int] = field(default_factory=list)  # encoder layers to adapt; empty = all
    cnn_blocks: int = 2  # residual adapter blocks on CNN image features (embedded encoder)

    def check(self) -> None:
        from desmoe.config import bad

        if not self.towers or any(t not in ("image", "text") for t in self.towers):  # none: nothing to train
            raise bad("towers", "a non-empty list of 'image' and/or 'text'", self.towers)
        if len(set(self.layers)) < len(self.layers):  # a repeated layer would get two adapter sites
            raise bad("layers", "distinct layer indices", self.layers)
        if self.cnn_blocks < 1:
            raise bad("cnn_blocks", "an integer >= 1", self.cnn_blocks)


class TRGEModel(nn.Module):
    def __init__(self, base: nn.Module, spec: GroupSpec, placement: Placement) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
            if p.dim() == 0:  # DeepSpeed's start-up broadcast cannot view a 0-dim tensor as bytes (logit_scale)
                p.data = p.data.reshape(1)
        self.spec = spec
        self.contexts = {"image": GroupContext(), "text": GroupContext()}
        self.draws = None  # accumulate.StepDraws while a micro-batch of an accumulated step runs
        self.cnn = hasattr(base, "vision_backbone_features")  # the embedded EfficientNet/MiniLM encoder
        self.feature_adapters: Optional[FeatureAdapters] = None
        if "image" in placement.towers:
            if self.cnn:
                dim = int(base.visual_projection.in_features)
                self.feature_adapters = FeatureAdapters(dim, placement.cnn_blocks, spec, self.contexts["image"])
            else:
                vis = base.vision_model.encoder.layers
                adapt_clip_encoder(vis, base.config.vision_config.hidden_size, spec, self.contexts["image"],
                                   placement.layers)
        if "text" in placement.towers:
            text = getattr(base, "text_model", None)
            if hasattr(text, "encoder") and hasattr(text.encoder, "layers"):  # CLIP text transformer
                adapt_clip_encoder(text.encoder.layers, base.config.text_config.hidden_size, spec,
                                   self.contexts["text"], placement.layers)
            elif hasattr(text, "encoder") and hasattr(text.encoder, "layer"):  # BERT
                adapt_bert_encoder(text.encoder.layer, text.config.hidden_size, spec, self.contexts["text"],
                                   placement.layers)
            else:
                raise ValueError("text tower is neither a CLIP text transformer nor a BERT encoder")

    @contextmanager
    def routed(self, tower: str, weights: Optional[Tensor]):
        ctx = self.contexts[tower]
        ctx.group_weights = weights
        try:
            yield
        finally:
            ctx.group_weights = None

    @contextmanager
    def drawing(self, draws):
        """One micro-batch of an accumulated training step draws its random numbers from ``draws``
        (accumulate.StepDraws: the image gates' noise rows of the whole step, the text tower replayed)."""
        self.draws, self.contexts["image"].draw_noise = draws, draws.image_noise
        try:
            yield
        finally:
            self.draws, self.contexts["image"].draw_noise = None, None

    def image_features(self, pixel_values: Optional[Tensor], weights: Optional[Tensor] = None,
                       cnn_features: Optional[Tensor] = None) -> Tensor:
        """L2-normalised image embeddings; ``weights`` [B, T] inter-group weights or None (frozen).
        With the CNN tower the adapters sit after the backbone, so its pooled features
        (``cnn_features``, from :meth:`cnn_features`) can be computed once and reused."""
        pixel_values, weights, cnn_features = self._here(pixel_values, weights, cnn_features)
        pixel_values, cnn_features = self._towers_dtype(pixel_values, cnn_features)
        with self.routed("image", weights):
            if self.cnn:
                f = cnn_features if cnn_features is not None else self.base.vision_backbone_features(pixel_values)
                if self.feature_adapters is not None:
                    f = self.feature_adapters(f)
                emb = self.base.visual_projection(f)
            else:
                emb = self.base.get_image_features(pixel_values=pixel_values)
        emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
        return F.normalize(emb.float(), dim=-1)

    def cnn_features(self, pixel_values: Tensor) -> Optional[Tensor]:
        """The frozen CNN's pooled features (None for a transformer image tower)."""
        return self.base.vision_backbone_features(*self._towers_dtype(*self._here(pixel_values))) if self.cnn else None

    def text_features(self, input_ids: Tensor, attention_mask: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        input_ids, attention_mask, weights = self._here(input_ids, attention_mask, weights)
        with self.routed("text", weights), (nullcontext() if self.draws is None else self.draws.text()):
            emb = self.base.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
        return F.normalize(emb.float(), dim=-1)

    @property
    def device(self) -> torch.device:
        """Where the (frozen and adapted) weights live: the engine's device once DeepSpeed placed the model."""
        return self.base.logit_scale.device

    def _here(self, *tensors: Optional[Tensor]) -> tuple:
        """The inputs on the model's device (host-side pixels, token ids, weights, cached CNN features: the
        engine does not move them; a no-op when they are already there, so CPU runs are unchanged)."""
        return tuple(None if t is None else t.to(self.device) for t in tensors)

    def _towers_dtype(self, *images: Optional[Tensor]) -> tuple:
        """Pixels and cached CNN features in the towers' dtype: DeepSpeed's bf16 engine casts the weights, not
        a forward's inputs, and the CNN tower (unlike HF CLIP) does not cast its own (fp32 pixels against bf16
        weights stopped the first bf16 step); a no-op in fp32."""
        dtype = self.base.logit_scale.dtype
        return tuple(None if t is None else t.to(dtype) for t in images)

    @property
    def scale(self) -> Tensor:
        return self.base.logit_scale.detach().float().exp()

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                image_weights: Optional[Tensor], text_weights: Optional[Tensor],
                cnn_features: Optional[Tensor] = None) -> Tensor:
        """Logits [B, C] of images against C class prompts (``cnn_features``: precomputed, see image_features)."""
        img = self.image_features(pixel_values, image_weights, cnn_features=cnn_features)
        txt = self.text_features(input_ids, attention_mask, text_weights)
        return self.scale * img @ txt.t()

    def trainable_parameters(self) -> int:
        """Adapter experts + gates of one group (what one task trains), summed over sites."""
        from desmoe.moe.layer import moe_blocks

        total = 0
        for block in moe_blocks(self):
            n = self.spec.experts_per_group
            per_expert = sum(p.numel() for p in block.local_experts[0].parameters())
            gate = sum(p.numel() for p in block.router.gates[0].parameters())
            total += n * per_expert + gate
        return total
