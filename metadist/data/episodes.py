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


def augment(xs: list[torch.Tensor], seed: int, step: int, tasks: range, p: float) -> list:
    """Task augmentation (data.task_aug), the one place it is applied: every image of each task in
    each of `xs` (tasks, n, C, H, W) turned by the quarter turns drawn for (seed, step, task)."""
    if p <= 0:
        return list(xs)
    ks = task_rotations(seed, step, tasks, p)
    return [rotate_tasks(x, ks) for x in xs]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float in [0, 1]. The one conversion every path uses:
    training batches, evaluation, predict and `show`. (Divided in place: the same values, one
    float copy instead of two, which matters for Meta-Dataset's 1,000-image episodes.)"""
    return x.float().div_(255)


# ---- variable episodes: Meta-Dataset's sampler ----

# A variable episode's record: (n, 5) int32 rows (class within the split, image within the class,
# quarter turns, label, part): the support rows (part 0) class by class, then the query rows
# (part 1) class by class; label k is the episode's k-th class.
VARIABLE_COLUMNS = 5


def group_members(groups: list[int]) -> list[np.ndarray]:
    """Group id per class -> each group's classes, groups in id order."""
    ids = np.asarray(groups)
    return [np.flatnonzero(ids == g) for g in np.unique(ids)]


def check_variable_split(class_sizes: list[int], v, groups: list[int] | None, split: str) -> None:
    """A split the sampler can draw from: every class with at least 2 images (a support and a
    query image), and enough classes (in every group, with groups) for data.variable.min_ways."""
    sizes = np.asarray(class_sizes)
    if len(sizes) and sizes.min() < 2:
        c = int(sizes.argmin())
        raise DataError(
            f"{split}: class {c} has {sizes[c]} image(s); variable episodes need at least "
            "2 a class (one support, one query): remove it or set data.folder.small_classes=skip "
            "with data.queries=1"
        )
    pools = group_members(groups) if groups is not None else [np.arange(len(sizes))]
    small = [len(p) for p in pools if len(p) < v.min_ways]
    if small:
        where = "a class group" if groups is not None else "the split"
        raise DataError(
            f"{split}: {where} has {min(small)} classes, fewer than data.variable.min_ways="
            f"{v.min_ways}: lower it, or group the classes otherwise (data.variable.groups)"
        )


def sample_variable_episode(
    class_sizes: list[int], rotations, v, rng: np.random.Generator, groups: list[int] | None = None
) -> np.ndarray:
    """One episode by Meta-Dataset's rules (google-research/meta-dataset, data/sampling.py), `v`
    holding their constants (data.variable):
    - with groups (Omniglot's alphabets), a group uniformly, then classes from it alone;
    - ways uniform in [min_ways, min(max_ways, classes available)], the classes without
      replacement;
    - queries per class: min(max_query, the smallest chosen class's size // 2), the same for all;
    - support size: min(max_support, sum over classes of floor(beta * min(max_support_per_class,
      remaining) + 1)), beta uniform in [0, 1) (remaining: a class's images less its queries);
    - each class's share: its size times exp(U(min_log_weight, max_log_weight)), normalised;
      floor(share * (support size - ways)) + 1, at most its remaining images;
    - the images of a class drawn at random without replacement (never in file order), its
      support first; a rotation per class from the split's set.
    Returns the record (VARIABLE_COLUMNS columns, see above)."""
    sizes = np.asarray(class_sizes)
    pool = np.arange(len(sizes))
    if groups is not None:
        members = group_members(groups)
        pool = members[int(rng.integers(len(members)))]
    ways = int(rng.integers(v.min_ways, min(v.max_ways, len(pool)) + 1))
    classes = rng.choice(pool, size=ways, replace=False)
    per_class = sizes[classes]
    queries = int(min(v.max_query, (per_class // 2).min()))
    remaining = per_class - queries
    beta = rng.uniform()
    contrib = np.minimum(v.max_support_per_class, remaining)
    support = int(min(np.floor(beta * contrib + 1).sum(), v.max_support))
    weights = per_class * np.exp(rng.uniform(v.min_log_weight, v.max_log_weight, size=ways))
    shots = np.floor(weights / weights.sum() * (support - ways)).astype(np.int64) + 1
    shots = np.minimum(shots, remaining)
    turns = rng.choice(rotations, size=ways)
    parts = [[], []]
    for label, (c, n_s, k) in enumerate(zip(classes, shots, turns)):
        images = rng.choice(sizes[c], size=n_s + queries, replace=False)
        for part, chosen in ((0, images[:n_s]), (1, images[n_s:])):
            rows = np.zeros((len(chosen), VARIABLE_COLUMNS), np.int64)
            rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4] = c, chosen, k, label, part
            parts[part].append(rows)
    return np.concatenate(parts[0] + parts[1]).astype(np.int32)
