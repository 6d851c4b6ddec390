"""Episodes (N-way, K-shot, Q-query tasks) sampled from seeded generators, and task augmentation.

Every random choice comes from a generator named by its parts (seed, split, episode index) or
(seed, step, task), never from global state, so any episode or augmentation can be recomputed
alone: that is what makes shards reproducible and resumed or rescaled runs identical.
Layout of one episode: support first, then query, class-major (labels arange(ways).repeat_interleave(k)).
"""
from __future__ import annotations

import numpy as np
import torch

from metadist.data.omniglot import DRAWINGS, DataError, Split

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_AUG_STREAM = 7   # keeps the augmentation generator apart from the episode generators


def episode_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def sample_episode(images: np.ndarray, split: Split, ways: int, shots: int, queries: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One task: `ways` distinct characters of `split`, each with a rotation from the split's set,
    `shots + queries` distinct drawings per class.

    Returns images (ways*(shots+queries), 28, 28) uint8 and the classes [(char index, k90)].
    """
    if ways > len(split.chars):
        raise DataError(f"{split.name}: {ways}-way episodes need {ways} characters, the split has {len(split.chars)}")
    chars = rng.choice(split.chars, size=ways, replace=False)
    rots = rng.choice(split.rotations, size=ways)
    support, query = [], []
    for c, k in zip(chars, rots):
        drawers = rng.choice(DRAWINGS, size=shots + queries, replace=False)
        imgs = np.rot90(images[c, drawers], k=int(k), axes=(1, 2))
        support.append(imgs[:shots])
        query.append(imgs[shots:])
    out = np.ascontiguousarray(np.concatenate(support + query))   # (ways*(shots+queries), 28, 28)
    return out, [(int(c), int(k)) for c, k in zip(chars, rots)]


def labels(ways: int, per_class: int) -> torch.Tensor:
    return torch.arange(ways).repeat_interleave(per_class)


def task_rotations(seed: int, step: int, tasks: range, p: float) -> list[int]:
    """Per task of a global meta-batch: 0, or (with probability p) 1 or 3 quarter turns."""
    out = []
    for t in tasks:
        rng = np.random.default_rng([seed, _AUG_STREAM, step, t])
        out.append(int(rng.choice([1, 3])) if rng.random() < p else 0)
    return out


def rotate_tasks(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Rotate every image of task i by ks[i] quarter turns. x: (tasks, n, 1, 28, 28)."""
    if not any(ks):
        return x
    return torch.stack([torch.rot90(xi, k, dims=(-2, -1)) if k else xi for xi, k in zip(x, ks)])


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., n, 28, 28) -> float in [0, 1] with a channel axis (..., n, 1, 28, 28).
    The one conversion every path uses: training batches, evaluation, predict and `show`."""
    return x.float().div(255).unsqueeze(-3)
