"""Where images come from: one module per source, each turning raw files into a `ClassSet`
(uint8 images per class and the train/val/test class lists), and the one preprocessing they share.

  omniglot  the official Omniglot zips or folders (metadist/data/sources/omniglot.py)
  folder    your own class folders and the standard split files (metadist/data/sources/folder.py)

Preprocessing (`preprocess`, deterministic; also what `predict` does to a task's images): decoded
uint8 -> float in [0, 1] -> inverted (1 - x) if asked -> bilinear antialiased resize (torch's
interpolate, which is what torchvision's resize runs on float tensors: bit-identical, checked;
torchvision's import alone would cost every process 2 s), `stretch`ed to size x size (the aspect
ratio is not kept, as the standard mini-ImageNet preparation does) or `crop`: the shorter side to
size, then the central size x size (torchvision's rounding) -> rounded to uint8.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from metadist.errors import MetadistError

SPLITS = ("train", "val", "test")


class DataError(MetadistError):
    """Raw data that is missing, unreadable, or not in a layout metadist knows."""


def preprocess(
    x: torch.Tensor, size: int, resize: str = "stretch", invert: bool = False
) -> torch.Tensor:
    """(n, C, H, W) uint8 as decoded -> (n, C, size, size) uint8 (see the module's docstring)."""
    x = x.float() / 255.0
    if invert:
        x = 1.0 - x
    h, w = x.shape[-2:]
    if resize == "crop":
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = round((nh - size) / 2.0), round((nw - size) / 2.0)
        x = x[..., top : top + size, left : left + size]
    else:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def decode(where, channels: int, data: bytes | None = None) -> torch.Tensor:
    """An image file (or its bytes, `where` naming them) -> (C, H, W) uint8 in grey (C=1) or RGB
    (C=3), with Pillow (torchvision's own dependency); an unreadable or truncated file is a
    DataError naming it."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else where) as img:
            img.load()
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as e:
        raise DataError(
            f"cannot read image {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    x = torch.from_numpy(arr.copy())
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)


@dataclass
class ClassSet:
    """names[i]: class i's name (a relative path, unique); images[i]: its images (n_i, C, H, W)
    uint8; splits[s]: the class indices of split s (no class in two splits); rotations[s]: the
    quarter turns k of np.rot90 that make extra classes of split s (the MAML paper's Omniglot);
    groups[i]: class i's group (variable episodes draw one episode's classes from one group), or
    None."""

    names: list[str]
    images: list[np.ndarray]
    splits: dict[str, list[int]]
    rotations: dict[str, tuple[int, ...]]
    source: dict = field(default_factory=dict)
    groups: list[str] | None = None

    def split_groups(self, split: str) -> list[int] | None:
        """The group of each of `split`'s classes, as ids 0.. in order of first appearance."""
        if self.groups is None:
            return None
        ids: dict[str, int] = {}
        return [ids.setdefault(self.groups[c], len(ids)) for c in self.splits[split]]

    def digest(self, split: str) -> str:
        """sha256 of split's class names and pixels, in order (the content, not the files)."""
        import hashlib

        h = hashlib.sha256()
        for c in self.splits[split]:
            h.update(self.names[c].encode() + b"\0")
            h.update(np.ascontiguousarray(self.images[c]).tobytes())
        return h.hexdigest()

    def check(self) -> None:
        seen: dict[int, str] = {}
        for s in SPLITS:
            for c in self.splits[s]:
                if c in seen:
                    raise DataError(f"class {self.names[c]!r} is in both {seen[c]} and {s}")
                seen[c] = s
        shapes = {x.shape[1:] for x in self.images}
        if len(shapes) != 1:
            raise DataError(f"images of different shapes after preprocessing: {sorted(shapes)}")
