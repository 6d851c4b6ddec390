"""Image in, tensor out, once for every reader of images outside the shards: the Python API, the
demo and `metadist predict` turn a file path, a PIL image, a uint8 array or tensor ((H, W),
(H, W, C) or (C, H, W)), a float one in [0, 1], or a batch of them, into what the model sees:
`Images(prep).tensor(images)` -> (n, C, size, size) float in [0, 1], through the run's own
preprocessing (metadist.data.prepare.preprocessing: the channels, size, resize and invert that
`prepare` applied to the shards, with the same `decode` and `preprocess`). Input it cannot take
is an `ImageError`, one line naming the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metadist.data.episodes import to_float
from metadist.data.sources import DataError, decode, preprocess
from metadist.errors import MetadistError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageError(MetadistError, ValueError):
    """An image that cannot be read or has the wrong form: the message names it."""


class Images:
    """The run's preprocessing `prep` (channels, size, resize, invert) applied to any images."""

    def __init__(self, prep: dict):
        self.prep = prep

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.prep["channels"], self.prep["size"], self.prep["size"])

    def tensor(self, images) -> torch.Tensor:
        """Images (see the module's docstring) -> (n, C, H, W) float in [0, 1] on the CPU."""
        return to_float(self.uint8(images))

    def uint8(self, images) -> torch.Tensor:
        """Images -> (n, C, H, W) uint8, as `prepare` writes them."""
        return torch.stack([self.one(x, i) for i, x in enumerate(items(images))])

    def one(self, x, i: int = 0) -> torch.Tensor:
        """One image -> (C, size, size) uint8; `i` names it in an error."""
        c, p = self.prep["channels"], self.prep
        if isinstance(x, (str, Path)):
            try:
                x = decode(Path(x), c)
            except DataError as e:
                raise ImageError(str(e)) from None
        else:
            x = uint8_chw(x, i, c)
        return preprocess(x[None], p["size"], p["resize"], p["invert"])[0]


def items(images) -> list:
    """One image or many -> a list of single images."""
    if isinstance(images, (str, Path)) or _is_pil(images):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [images] if images.ndim in (2, 3) and not _stacked(images) else list(images)
    out = list(images)
    if not out:
        raise ImageError("images: none given")
    return out


def _stacked(x) -> bool:
    """A 3-d array is one image, (H, W, C) or (C, H, W) with C in 1, 3, 4; else n images."""
    return x.ndim == 3 and x.shape[0] not in (1, 3, 4) and x.shape[-1] not in (1, 3, 4)


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.")


def uint8_chw(x, i: int, channels: int) -> torch.Tensor:
    """One image as an array, tensor or PIL image -> (C, H, W) uint8 with the run's channels."""
    if _is_pil(x):
        x = np.asarray(x.convert("L" if channels == 1 else "RGB"))
    t = torch.as_tensor(np.array(x)) if not isinstance(x, torch.Tensor) else x.detach().cpu()
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)  # (H, W, C)
    if t.ndim != 3:
        raise ImageError(
            f"image {i}: shape {tuple(t.shape)}, expected (H, W), (H, W, C) or (C, H, W)"
        )
    if t.shape[0] == 4:
        t = t[:3]  # RGBA: the colour, as Pillow's convert does without a background
    if t.shape[0] != channels:
        if channels == 3 and t.shape[0] == 1:
            raise ImageError(
                f"image {i}: 1 channel, this run's model takes 3 (RGB): give colour images"
            )
        raise ImageError(
            f"image {i}: {t.shape[0]} channels, this run's model takes {channels} (grey): convert "
            "it, or give a file path (read in the run's channels)"
        )
    low, high = (0, 1) if t.is_floating_point() else (0, 255)
    if t.numel() and (t.min() < low or t.max() > high):
        raise ImageError(
            f"image {i}: {t.dtype} values outside {low}..{high} (floats in [0, 1], ints 0..255)"
        )
    return ((t * 255).round() if t.is_floating_point() else t).to(torch.uint8)
