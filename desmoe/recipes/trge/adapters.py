"""Where the expert groups plug into the towers (model code stays unmodified).

* HF CLIP encoder layers (pre-LN): out = h' + MLP(LN2(h')) + A(h'), h' the
  residual stream after attention -- the MoE-Adapters placement.  ``layer_norm2``
  is wrapped to keep its input h', ``mlp`` to add A(h').
* HF BERT layers (post-LN, the embedded text tower): the adapter joins the
  residual sum inside ``BertOutput``: LN(FFN(h') + h' + A(h')).
* CNN image tower: residual adapter blocks f <- f + A(f) on the pooled feature
  before the projection (``FeatureAdapters``).

A is a :class:`~desmoe.moe.MoEBlock` of expert groups routed per sample on the
first token (CLS/BOS).  While the tower's :class:`GroupContext` holds no group
weights the adapters are skipped entirely, so the same module also computes the
frozen model's outputs.
"""
from __future__ import annotations

from torch import Tensor, nn

from desmoe.errors import UserError
from desmoe.recipes.trge.groups import GroupSpec, build_group_block
from desmoe.recipes.trge.intra_group import GroupContext


class _InputTap(nn.Module):
    """Runs ``inner`` and remembers its input for the parallel adapter."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.last_input: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.last_input = x
        return self.inner(x)


class ParallelAdapterMLP(nn.Module):
    def __init__(self, mlp: nn.Module, tap: _InputTap, adapter: nn.Module, context: GroupContext) -> None:
        super().__init__()
        self.mlp, self.adapter = mlp, adapter
        self._tap = [tap]  # a list: the tap is owned by the layer, not registered twice
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)
        if self.context.active:
            h = self._tap[0].last_input
            out = out + self.adapter(h)
        self._tap[0].last_input = None
        return out


class AdaptedBertOutput(nn.Module):
    def __init__(self, output: nn.Module, adapter: nn.Module, context: GroupContext) -> None:
        super().__init__()
        self.inner, self.adapter, self.context = output, adapter, context

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        o = self.inner
        h = o.dropout(o.dense(hidden_states)) + input_tensor
        if self.context.active:
            h = h + self.adapter(input_tensor)
        return o.LayerNorm(h)


class FeatureAdapters(nn.Module):
    """Residual adapter blocks on a pooled feature vector [B, d]."""

    def __init__(self, dim: int, num_blocks: int, spec: GroupSpec, context: GroupContext) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(build_group_block(dim, spec, context) for _ in range(num_blocks))
        self.context = context

    def forward(self, f: Tensor) -> Tensor:
        if not self.context.active:
            return f
        h = f.unsqueeze(1)
        for block in self.blocks:
            h = h + block(h)
        return h.squeeze(1)


def _chosen(encoder_layers: nn.ModuleList, layers: list[int] | None) -> range | list[int]:
    """The layer indices to adapt (all when ``layers`` is empty); one line for an index the tower lacks."""
    n = len(encoder_layers)
    if not layers:
        return range(n)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise UserError(f"key 'placement.layers': expected layer indices in 0..{n - 1} (this tower has {n} "
                        f"layers), got {bad[0]}")
    if len({i % n for i in layers}) < len(layers):  # e.g. 0 and -n: the same layer twice
        raise UserError(f"key 'placement.layers': expected distinct layers (this tower has {n}), got {layers}")
    return layers


def adapt_clip_encoder(encoder_layers: nn.ModuleList, hidden_size: int, spec: GroupSpec,
                       context: GroupContext, layers: list[int] | None = None) -> int:
    """Put a group block beside the MLP of HF CLIP encoder layers; returns how many."""
    chosen = _chosen(encoder_layers, layers)
    for i in chosen:
        layer = encoder_layers[i]
        tap = _InputTap(layer.layer_norm2)
        layer.layer_norm2 = tap
        layer.mlp = ParallelAdapterMLP(layer.mlp, tap, build_group_block(hidden_size, spec, context), context)
    return len(chosen)


def adapt_bert_encoder(bert_layers: nn.ModuleList, hidden_size: int, spec: GroupSpec,
                       context: GroupContext, layers: list[int] | None = None) -> int:
    chosen = _chosen(bert_layers, layers)
    for i in chosen:
        layer = bert_layers[i]
        layer.output = AdaptedBertOutput(layer.output, build_group_block(hidden_size, spec, context), context)
    return len(chosen)
