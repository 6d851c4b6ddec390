"""Conv4, the reference conv net of MAML: `depth` blocks of [conv 3x3 (no bias) -> BatchNorm on
batch statistics -> ReLU -> max-pool 2], then a linear head over the flattened features.

The ReLU runs after the pooling: ReLU is monotonic, so max(relu(x)) = relu(max(x)) exactly, the
max picks the same element, and the gradients route through the same positions with the same values
(max-pooling's windows do not overlap), in both orders of derivative, bit for bit; the ReLU and its
backward then touch a quarter of the elements.
`model.hidden` filters (64 for Omniglot, 32 for the MAML paper's mini-ImageNet), input channels
and size from the shards' manifest: 28 -> 14 -> 7 -> 3 -> 1 for Omniglot, 84 -> ... -> 5 at 84 px.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from metadist.config import ConfigError
from metadist.models.common import (
    Backbone,
    BatchStatNorm,
    InnerRates,
    fold,
    max_pool2,
    task_conv,
    task_norm,
)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, bn_steps: int = 0):
        super().__init__()
        # no conv bias: BatchNorm subtracts the per-channel mean, so its true gradient is exactly 0.
        # What it would receive is rounding noise, which Adam scales into full steps whose sign
        # depends on summation order (world size); without it, runs of any size agree.
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = BatchStatNorm(cout, bn_steps)

    def forward(self, x):
        return F.relu(F.max_pool2d(self.norm(self.conv(x)), 2))


def feature_side(depth: int, side: int = 28) -> int:
    for _ in range(depth):
        side //= 2
    return side


class ConvNet(Backbone):
    def __init__(
        self,
        ways: int,
        hidden: int = 64,
        depth: int = 4,
        in_channels: int = 1,
        side: int = 28,
        rates: InnerRates = InnerRates(),
    ):
        super().__init__()
        self.hidden, self.depth = hidden, depth
        self.blocks = nn.Sequential(
            *[
                Block(in_channels if i == 0 else hidden, hidden, rates.bn_steps)
                for i in range(depth)
            ]
        )
        self.feature_dim = hidden * feature_side(depth, side) ** 2
        self.finish(ways, rates)

    def is_norm(self, name: str) -> bool:
        return ".norm." in name

    def features(self, x):
        return self.blocks(x).flatten(1)

    def tasks_features(self, params, x, step=0, native_norm=False, rng=None, mask=None):
        """Tasks folded into channels: (n, T*C, H, W) with grouped convolutions, so each task keeps
        its own BatchNorm statistics (of its real images alone, with a `mask`)."""
        T, n = x.shape[:2]
        h = fold(x)
        for i in range(self.depth):
            h = task_conv(h, params[f"blocks.{i}.conv.weight"])
            h = task_norm(
                h,
                params[f"blocks.{i}.norm.weight"],
                params[f"blocks.{i}.norm.bias"],
                step,
                native_norm,
                mask,
            )
            h = F.relu(max_pool2(h))
        return h.reshape(n, T, -1).transpose(0, 1)  # (T, n, features)


def build(ways: int, image_shape: tuple[int, int, int], model, rates: InnerRates) -> ConvNet:
    c, side, _ = image_shape
    if side >> model.depth < 1:
        raise ConfigError(
            f"model.depth={model.depth}: each block halves the image, {side} px allows at most "
            f"{side.bit_length() - 1} blocks"
        )
    return ConvNet(ways, model.hidden, model.depth, in_channels=c, side=side, rates=rates)
