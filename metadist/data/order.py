"""The training order: a rank's meta-batches that depend on (seed, step) only, never on the
world size.

Epoch e visits the episode shards in a permutation of (seed, e) and each shard's episodes in a
permutation of (seed, e, shard); global position p = step * meta_batch + task. Rank r of W takes
tasks [r*B/W, (r+1)*B/W) of every step, so the global batch is the same for any W. DataLoader
workers take steps round-robin; task augmentation is drawn per (seed, step, task); many sources
draw each task's source by weight from (seed, step, task) (`SourceMix`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metadist.config import shares
from metadist.data.episodes import augment, to_float
from metadist.data.split import EpisodeSource, pad_batch, to_batch


@dataclass(frozen=True)
class StreamSpec:
    """What a rank's train stream is: the run's seed (visiting order, task augmentation), the
    global meta-batch and this rank's place in it, the steps [start, stop), and how it is read."""

    seed: int
    meta_batch_size: int
    rank: int = 0
    world_size: int = 1
    start: int = 0
    stop: int = 1
    task_aug: float = 0.0
    num_workers: int = 0
    device: object = None  # a torch device: the split resident there (ResidentBatches)
    source_weights: tuple = ()  # many sources: each task's source drawn by these (uniform: ())

    @property
    def share(self) -> int:
        return shares(self.meta_batch_size, self.world_size)

    @property
    def tasks(self) -> range:
        """This rank's tasks (global indices within a step)."""
        return range(self.rank * self.share, (self.rank + 1) * self.share)


class MetaBatches(IterableDataset):
    """Rank `spec.rank`'s share of the global meta-batches for steps [start, stop), in step order.

    DataLoader workers take steps round-robin (worker k: start+k, start+k+n, ...), which the
    DataLoader yields back in order. Task augmentation is drawn per (seed, step, global task).
    """

    def __init__(self, source: EpisodeSource, spec: StreamSpec):
        self.source, self.spec = source, spec
        self.batch, self.tasks = spec.meta_batch_size, spec.tasks

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        x = self.source.episodes([step * self.batch + t for t in self.tasks])
        return self._finish(x, step)

    def _finish(self, x, step: int) -> dict[str, torch.Tensor]:
        """uint8 episodes of this rank's tasks (numpy, or a tensor on any device) -> the step's
        batch, task augmentation applied where the episodes are."""
        return self._augment(
            to_batch(x, self.source.ways, self.source.shots, self.source.queries), step
        )

    def _augment(self, b: dict, step: int) -> dict[str, torch.Tensor]:
        """The step's batch with task augmentation (data.task_aug) and its step."""
        s = self.spec
        b["x_support"], b["x_query"] = augment(
            [b["x_support"], b["x_query"]], s.seed, step, self.tasks, s.task_aug
        )
        b["step"] = step
        return b

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.spec.start + k, self.spec.stop, n):
            yield self.batch_at(step)


class VariableBatches(MetaBatches):
    """The same stream as MetaBatches over a split of variable episodes: each step's episodes
    padded to their largest (pad_batch), with task augmentation on the padded images."""

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        recs = self.source.records_at([step * self.batch + t for t in self.tasks])
        return self._augment(pad_batch(recs, self.source.gather), step)


class SourceMix:
    """Which source each task of a run draws its episode from, and which of that source's
    episodes: the source of global task t of step s drawn by `weights` from (seed, s, t) alone, so
    the draw does not depend on the world size; source k's episodes taken in its own stream order
    (EpisodeSource.locate), the n-th task drawn from it getting position n. The draws come in
    blocks of BLOCK steps, each from its own generator, with their counts cumulated, so a resumed
    run finds its positions without replaying every step."""

    BLOCK = 1024

    def __init__(self, weights: list[float], seed: int, batch: int):
        w = np.asarray(weights, np.float64)
        self.p, self.seed, self.batch = w / w.sum(), seed, batch
        self._before = [np.zeros(len(w), np.int64)]  # counts before each block

    @lru_cache(maxsize=2)  # noqa: B019 (one mix per run)
    def _block(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 19, b])
        return rng.choice(len(self.p), size=(self.BLOCK, self.batch), p=self.p)

    def at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, position) of every task of `step`: two (batch,) arrays."""
        b, r = divmod(step, self.BLOCK)
        while len(self._before) <= b:
            k = len(self._before) - 1
            counts = np.bincount(self._block(k).ravel(), minlength=len(self.p))
            self._before.append(self._before[-1] + counts)
        block = self._block(b)
        seen = self._before[b] + np.bincount(block[:r].ravel(), minlength=len(self.p))
        src = block[r]
        pos = np.empty(self.batch, np.int64)
        for t, k in enumerate(src.tolist()):
            pos[t] = seen[k]
            seen[k] += 1
        return src, pos


class MixedBatches(MetaBatches):
    """Meta-batches whose tasks come from several sources (data.sources), each task's source and
    episode from a SourceMix: episodes padded to the step's largest (variable ones; fixed ones all
    of one shape are stacked), with `source` (tasks, sources), each task's source one-hot."""

    def __init__(self, sources: list[EpisodeSource], weights: list[float], spec: StreamSpec):
        super().__init__(sources[0], spec)
        self.sources = sources
        self.mix = SourceMix(weights, spec.seed, spec.meta_batch_size)

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        src, pos = self.mix.at(step)
        mine = [(self.sources[src[t]], int(pos[t])) for t in self.tasks]
        recs = [s.records_at([p])[0] for s, p in mine]
        if self.source.variable:
            b = pad_batch(recs, [s.gather for s, _ in mine])
        else:
            x = np.stack([s.gather(r) for (s, _), r in zip(mine, recs)])
            b = to_batch(x, self.source.ways, self.source.shots, self.source.queries)
        b["source"] = torch.nn.functional.one_hot(
            torch.from_numpy(src[self.tasks.start : self.tasks.stop]), len(self.sources)
        ).float()
        return self._augment(b, step)


class ClassBatches(MetaBatches):
    """Image batches with class labels over a whole split (supervised pre-training): each of a
    step's meta_batch_size "tasks" is a group of `group` images, labelled by their class
    (0 .. classes-1), as y_support (the query is empty). Epoch e visits the split's images in a
    permutation of (seed, e); group g of the global stream holds images [g*group, (g+1)*group).
    Like the episode stream, it depends on (seed, step) only: the same for any world size."""

    def __init__(self, source: EpisodeSource, spec: StreamSpec, group: int):
        super().__init__(source, spec)
        self.group = group
        self.labels = np.repeat(np.arange(len(source.class_images)), source.class_images)

    @lru_cache(maxsize=4)  # noqa: B019 (one reader per run)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.spec.seed, 13, epoch]).permutation(len(self.labels))

    def indices(self, step: int) -> np.ndarray:
        """(tasks, group) image indices of this rank's share of `step`."""
        n, share = len(self.labels), len(self.tasks)
        first = (step * self.batch + self.tasks.start) * self.group
        idx = np.array(
            [self._order(p // n)[p % n] for p in range(first, first + share * self.group)]
        )
        return idx.reshape(share, self.group)

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.indices(step)
        # (tasks, group, C, H, W)
        x = to_float(torch.from_numpy(self.source.pool[idx]))
        y = torch.from_numpy(self.labels[idx])
        b = {"x_support": x, "y_support": y, "x_query": x[:, :0], "y_query": y[:, :0]}
        return self._augment(b, step)


def loader(ds: MetaBatches, num_workers: int):
    """An iterator over a batch reader: in this process, or from `num_workers` forked DataLoader
    workers (the pools are read and checked first, so they share them)."""
    for source in getattr(ds, "sources", [ds.source]):
        _ = source.pool
    if num_workers == 0:
        return iter(ds)
    return iter(
        DataLoader(
            ds,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=4,
            multiprocessing_context="fork" if os.name == "posix" else None,
        )
    )
