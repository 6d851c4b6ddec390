"""ResNet-12, the standard few-shot residual net (MetaOptNet, learn2learn, UNICORN-MAML): four
residual blocks of three 3x3 convolutions (no bias) with BatchNorm on batch statistics and leaky
ReLU 0.1, a 1x1 convolution + BatchNorm on the shortcut, then leaky ReLU and a 2x2 max-pool;
widths `model.widths` (64-160-320-640); global average pooling gives the features of the linear
head (640). DropBlock (Ghiasi et al. 2018) after blocks 3 and 4 when `model.dropblock` > 0 (the
drop rate; block size 5 at 84 px), in meta-training only, its masks drawn from the generator the
meta-step gives each chunk of tasks (the forward's `rng`), so runs stay reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metadist.config import ConfigError
from metadist.models.common import (
    Backbone,
    BatchStatNorm,
    InnerRates,
    fold,
    fold_mask,
    max_pool2,
    task_conv,
    task_norm,
)

SLOPE = 0.1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, bn_steps: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = BatchStatNorm(cout, bn_steps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = BatchStatNorm(cout, bn_steps)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = BatchStatNorm(cout, bn_steps)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_sc = BatchStatNorm(cout, bn_steps)

    def forward(self, x):
        out = F.leaky_relu(self.bn1(self.conv1(x)), SLOPE)
        out = F.leaky_relu(self.bn2(self.conv2(out)), SLOPE)
        out = self.bn3(self.conv3(out))
        return F.max_pool2d(F.leaky_relu(out + self.bn_sc(self.shortcut(x)), SLOPE), 2)


class ResNet12(Backbone):
    def __init__(
        self,
        ways: int,
        widths=(64, 160, 320, 640),
        in_channels: int = 3,
        side: int = 84,
        rates: InnerRates = InnerRates(),
        dropblock: float = 0.0,
    ):
        super().__init__()
        self.widths, self.dropblock = tuple(widths), dropblock
        self.blocks = nn.Sequential(
            *[
                ResBlock(in_channels if i == 0 else widths[i - 1], w, rates.bn_steps)
                for i, w in enumerate(widths)
            ]
        )
        self.feature_dim = widths[-1]
        # 5 at 84 px (the feature maps there are 10 and 5 wide)
        self.block_size = max(1, min(5, side // 16))
        self.finish(ways, rates)

    def is_norm(self, name: str) -> bool:
        return ".bn" in name

    def features(self, x):
        return self.blocks(x).mean((2, 3))

    def _drop(self, h: torch.Tensor, i: int, T: int, rng, mask=None) -> torch.Tensor:
        """DropBlock on (n, T*C, H, W), each task's mask rescaled by its own kept fraction (of its
        real images, with a padding `mask` (T, n))."""
        if not self.dropblock or rng is None or i < 2:
            return h
        n, tc, H, W = h.shape
        bs = min(self.block_size, H, W)
        gamma = self.dropblock / bs**2 * (H * W) / ((H - bs + 1) * (W - bs + 1))
        seeds = (
            torch.rand((n, tc, H - bs + 1, W - bs + 1), generator=rng, device="cpu") < gamma
        ).to(h)
        pad = bs - 1
        blocks = F.max_pool2d(F.pad(seeds, (pad, pad, pad, pad)), bs, stride=1)[..., :H, :W]
        keep = 1.0 - blocks
        if mask is None:
            kept = keep.reshape(n, T, -1, H, W).sum((0, 2, 3, 4)).clamp_min(1.0)  # per task
            scale = (keep.numel() / T) / kept
        else:
            m = fold_mask(mask, tc // T).to(keep)
            kept = (keep * m).reshape(n, T, -1, H, W).sum((0, 2, 3, 4)).clamp_min(1.0)
            scale = m.reshape(n, T, -1).sum((0, 2)) * (H * W) / kept
        return h * keep * scale.repeat_interleave(tc // T).view(1, tc, 1, 1)

    def tasks_features(self, params, x, step=0, native_norm=False, rng=None, mask=None):
        T, n = x.shape[:2]
        h = fold(x)
        for i in range(len(self.widths)):
            p = f"blocks.{i}."

            def conv_norm(inp, conv, bn, padding=1, p=p):
                return task_norm(
                    task_conv(inp, params[p + conv + ".weight"], padding),
                    params[p + bn + ".weight"],
                    params[p + bn + ".bias"],
                    step,
                    native_norm,
                    mask,
                )

            out = F.leaky_relu(conv_norm(h, "conv1", "bn1"), SLOPE)
            out = F.leaky_relu(conv_norm(out, "conv2", "bn2"), SLOPE)
            out = conv_norm(out, "conv3", "bn3")
            h = max_pool2(F.leaky_relu(out + conv_norm(h, "shortcut", "bn_sc", padding=0), SLOPE))
            h = self._drop(h, i, T, rng, mask)
        return h.mean((2, 3)).reshape(n, T, -1).transpose(0, 1)  # (T, n, widths[-1])


def build(ways: int, image_shape: tuple[int, int, int], model, rates: InnerRates) -> ResNet12:
    c, side, _ = image_shape
    try:
        widths = tuple(int(w) for w in model.widths.split(","))
    except ValueError:
        raise ConfigError(
            f"model.widths={model.widths!r}: four comma-separated integers, e.g. 64,160,320,640"
        ) from None
    if len(widths) != 4 or min(widths) < 1:
        raise ConfigError(
            f"model.widths={model.widths!r}: four positive widths, e.g. 64,160,320,640"
        )
    if side < 16:
        raise ConfigError(
            f"data.image_size={side}: ResNet-12 halves the image four times; use at least 16 px"
        )
    return ResNet12(ways, widths, in_channels=c, side=side, rates=rates, dropblock=model.dropblock)
