"""Looking at and exporting episodes: `export-tasks` writes a split in the exercise's test layout
(<dir>/support/NNNN/image_i.png, <dir>/query/NNNN/image_j.png; support image i is class i), and
`show` writes a labelled PNG grid of a few episodes (one row each: support, then query).

Exported images have the shards' size and channels and the source's polarity (Omniglot: dark
strokes on white again), so reading them back through the training preprocessing (`predict`)
gives the shard's pixels exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.utils as vutils
from PIL import Image, ImageDraw

from metadist.data.episodes import augment, to_float
from metadist.errors import MetadistError


def to_image(img: np.ndarray) -> Image.Image:
    """(C, H, W) uint8 -> a grey (C=1) or RGB (C=3) PIL image."""
    return Image.fromarray(
        img[0] if img.shape[0] == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))
    )


def export_tasks(
    episodes, ways: int, shots: int, queries: int, out: Path, invert: bool = False
) -> int:
    """episodes: (E, ways*(shots+queries), C, H, W) uint8 (an array or a split's Episodes); invert:
    the preprocessing inverted the source (undone here). Only 1-shot splits fit the layout."""
    if shots != 1:
        raise MetadistError(
            "export-tasks: the exercise's layout has one support image per class; this split has "
            f"{shots} shots"
        )
    out = Path(out)
    for e, x in enumerate(episodes):
        # Omniglot: back to dark strokes on white
        raw = 255 - x if invert else x
        for part, imgs in (("support", raw[:ways]), ("query", raw[ways:])):
            d = out / part / f"{e:04d}"
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(imgs):
                to_image(img).save(d / f"image_{i}.png")
    return len(episodes)


def show(
    episodes: np.ndarray,
    ways: int,
    shots: int,
    queries: int,
    out: Path,
    task_aug: float = 0.0,
    seed: int = 0,
) -> Path:
    """A grid: one row per episode, support then query, with a white gap between them; columns
    are labelled s<c> (support of class c) and q<c> (query of class c).
    With task_aug > 0 the rows show the rotations training would apply (step 0)."""
    x = to_float(torch.from_numpy(np.asarray(episodes[:])))  # (E, n, C, H, W)
    (x,) = augment([x], seed, 0, range(len(x)), task_aug)
    ns = ways * shots
    gap = torch.ones(len(x), 1, *x.shape[2:])
    rows = torch.cat([x[:, :ns], gap, x[:, ns:]], 1)  # support | gap | query
    grid = vutils.make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=2, pad_value=0.5)
    img = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    cell = x.shape[-1] + 2  # the image + padding
    canvas = Image.new("RGB", (img.width + 40, img.height + 14), "white")
    canvas.paste(img, (40, 14))
    draw = ImageDraw.Draw(canvas)
    per_class = (
        [(c, "s") for c in range(ways) for _ in range(shots)]
        + [None]
        + [(c, "q") for c in range(ways) for _ in range(queries)]
    )
    for j, lab in enumerate(per_class):
        if lab:
            draw.text((40 + j * cell + 6, 1), f"{lab[1]}{lab[0]}", fill="black")
    for i in range(len(x)):
        draw.text((2, 14 + i * cell + cell // 3), f"ep{i}", fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
