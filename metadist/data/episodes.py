"""Episodes (N-way, K-shot, Q-query tasks) sampled from seeded generators, and task augmentation.

Every random choice comes from a generator named by its parts (seed, split, episode index) or
(seed, step, task), never from global state, so any episode or augmentation can be recomputed
alone: that is what makes shards reproducible and resumed or rescaled runs identical.
An episode is a record of which images it uses: (ways*(shots+queries), 3) int32 rows
(class within the split, image within the class, quarter turns), support first, then query,
class-major (labels arange(ways).repeat_interleave(k)); the pixels come from the split's pool.
"""

from __future__ import annotations

import numpy as np
import torch

from metadist.data.sources import DataError

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_AUG_STREAM = 7  # keeps the augmentation generator apart from the episode generators


def episode_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def sample_episode(
    class_sizes: list[int],
    rotations: tuple[int, ...],
    ways: int,
    shots: int,
    queries: int,
    rng: np.random.Generator,
    split: str = "",
) -> np.ndarray:
    """One task: `ways` distinct classes of the split (class_sizes[c]: images of its class c), each
    with a rotation from `rotations`, `shots + queries` distinct images per class.
    Returns (ways*(shots+queries), 3) int32: (class, image, quarter turns) per image."""
    if ways > len(class_sizes):
        raise DataError(
            f"{split}: {ways}-way episodes need {ways} classes, the split has {len(class_sizes)}"
        )
    classes = rng.choice(len(class_sizes), size=ways, replace=False)
    rots = rng.choice(rotations, size=ways)
    support, query = [], []
    for c, k in zip(classes, rots):
        images = rng.choice(class_sizes[c], size=shots + queries, replace=False)
        rows = np.stack([np.full(shots + queries, c), images, np.full(shots + queries, k)], 1)
        support.append(rows[:shots])
        query.append(rows[shots:])
    return np.concatenate(support + query).astype(np.int32)


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
    """Rotate every image of task i by ks[i] quarter turns. x: (tasks, n, C, H, W)."""
    if not any(ks):
        return x
    return torch.stack([torch.rot90(xi, k, dims=(-2, -1)) if k else xi for xi, k in zip(x, ks)])


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float in [0, 1]. The one conversion every path uses:
    training batches, evaluation, predict and `show`."""
    return x.float().div(255)
