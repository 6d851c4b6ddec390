"""Looking at and exporting episodes: `export-tasks` writes a split in the exercise's test layout
(<dir>/support/NNNN/image_i.png, <dir>/query/NNNN/image_j.png; support image i is class i), and
`show` writes a labelled PNG grid of a few episodes (one row each: support, then query).

Exported images are 28x28 with the original polarity (dark strokes on white), so reading them
back through the training preprocessing gives the shard's pixels exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.utils as vutils
from PIL import Image, ImageDraw

from metadist.data.episodes import rotate_tasks, task_rotations, to_float
from metadist.errors import MetadistError


def export_tasks(episodes: np.ndarray, ways: int, shots: int, queries: int, out: Path) -> int:
    """episodes: (E, ways*(shots+queries), 28, 28) uint8. Only 1-shot splits fit the layout."""
    if shots != 1:
        raise MetadistError(f"export-tasks: the exercise's layout has one support image per class; this split has {shots} shots")
    out = Path(out)
    for e, x in enumerate(episodes):
        raw = 255 - x                                             # back to dark strokes on white
        for part, imgs in (("support", raw[:ways]), ("query", raw[ways:])):
            d = out / part / f"{e:04d}"
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(d / f"image_{i}.png")
    return len(episodes)


def show(episodes: np.ndarray, ways: int, shots: int, queries: int, out: Path, task_aug: float = 0.0, seed: int = 0) -> Path:
    """A grid: one row per episode, support then query, with a white gap between them; columns
    are labelled s<c> (support of class c) and q<c> (query of class c).
    With task_aug > 0 the rows show the rotations training would apply (step 0)."""
    x = to_float(torch.from_numpy(episodes))      # (E, n, 1, 28, 28)
    if task_aug > 0:
        x = rotate_tasks(x, task_rotations(seed, 0, range(len(x)), task_aug))
    ns = ways * shots
    gap = torch.ones(len(x), 1, 1, 28, 28)
    rows = torch.cat([x[:, :ns], gap, x[:, ns:]], 1)                   # support | gap | query
    grid = vutils.make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=2, pad_value=0.5)
    img = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    cell = 30                                                            # 28 px + padding
    canvas = Image.new("RGB", (img.width + 40, img.height + 14), "white")
    canvas.paste(img, (40, 14))
    draw = ImageDraw.Draw(canvas)
    per_class = [(c, "s") for c in range(ways) for _ in range(shots)] + [None] + \
                [(c, "q") for c in range(ways) for _ in range(queries)]
    for j, lab in enumerate(per_class):
        if lab:
            draw.text((40 + j * cell + 6, 1), f"{lab[1]}{lab[0]}", fill="black")
    for i in range(len(x)):
        draw.text((2, 14 + i * cell + 9), f"ep{i}", fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
