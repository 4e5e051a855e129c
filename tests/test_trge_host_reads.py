"""TRGE's reads of device values on the host (each one waits for the GPU), counted on the CPU.

The group router sizes its top-k by the most groups with weight > 0 in one row of the inter-group weights, a
value that lives on the device: read by every adapted layer of every forward (and again by each layer's
recompute), it stalled the stream once per layer.  The count is now read once per weight tensor (and version)
and shared by the tower's layers and by every step of a training stage, which reuses one weight tensor.
"""
import sys

import torch

from test_gpu_paths import _SyncingOps
from test_trge_recompute import _model


class _OursSyncing(_SyncingOps):
    """test_gpu_paths' syncing ops, only those asked for by desmoe's code (transformers' mask helpers read
    the attention mask themselves, outside this project)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n = len(self.seen)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.seen) > n and not _caller_is_desmoe():
            self.seen.pop()
        return out


def _caller_is_desmoe() -> bool:
    """The nearest caller outside torch and the recording mode is a module of the desmoe package."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in ("torch", "test_gpu_paths", __name__):
            return module.split(".")[0] == "desmoe"
        frame = frame.f_back
    return False


def _reads(fn):
    """(ops that wait for the device, fn's result): .item(), nonzero, ... (desmoe.kernels' CPU loops aside)."""
    with _OursSyncing() as ops:
        out = fn()
    return len(ops.seen), out


def _groups_routed(model) -> list[int]:
    """Per adapted image layer: the groups each sample was routed to in the last forward (routes / top_k)."""
    from desmoe.moe.layer import moe_blocks

    return [b.last_routing.expert_ids.shape[1] // model.spec.top_k for b in moe_blocks(model.base.vision_model)]


def test_group_count_read_once_per_weight_tensor():
    model, backbone = _model("clip")  # 2 adapted layers per tower, groups.max_groups=2
    model.eval()
    torch.manual_seed(0)
    px = torch.randn(4, 3, backbone.image_size, backbone.image_size)
    w = torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.6, 0.0, 0.4]])
    with torch.no_grad():
        fresh = model.image_features(px, w.clone())
        reads = [_reads(lambda: model.image_features(px, w)) for _ in range(2)]
        # one read for the tower's first forward with these weights (was 2: one per layer), none after
        assert [n for n, _ in reads] == [1, 0]
        assert all(torch.equal(out, fresh) for _, out in reads)  # the same numbers as with new weights
        assert _groups_routed(model) == [2, 2]
        # weights changed in place (a new version): read again, and route only the groups now in use
        w.copy_(torch.tensor([[0.0, 1.0, 0.0]]).expand(4, 3))
        n, out = _reads(lambda: model.image_features(px, w))
        assert n == 1 and _groups_routed(model) == [1, 1]
        assert torch.equal(out, model.image_features(px, w.clone()))


def test_training_steps_and_recompute_read_nothing_after_the_first():
    from desmoe.recipes.trge.inter_group import one_hot_weights
    from desmoe.recompute import apply

    model, backbone = _model("clip")
    assert apply(model, "layers") == 4  # the backward recomputes every adapted layer
    model.train()
    torch.manual_seed(0)
    px = torch.randn(4, 3, backbone.image_size, backbone.image_size)
    ids, mask = backbone.tokenize(["a 1", "a 2", "a 3"])
    w_img, w_txt = one_hot_weights(1, 4, 3), one_hot_weights(1, 3, 3)  # built once per stage, as the recipe

    def step():
        model(px, ids, mask, w_img, w_txt).sum().backward()

    # the first step reads each tower's count once in the forward and once in its first layer's recompute
    # (that layer's forward started before the count was known); later steps read none (was 8 each: 4 layers'
    # forwards and recomputes)
    assert [_reads(step)[0] for _ in range(3)] == [4, 0, 0]
