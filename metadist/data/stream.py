"""Episodes back from shards: a split's episodes by index (`EpisodeSource.all()`: the fixed val and
test sets) and the train stream as meta-batches that depend on (seed, step) only, never on the
world size (`meta_batches(source, spec)`).

Order: epoch e visits the episode shards in a permutation of (seed, e) and each shard's episodes
in a permutation of (seed, e, shard); global position p = step * meta_batch + task. Rank r of W
takes tasks [r*B/W, (r+1)*B/W) of every step, so the global batch is the same for any W.
DataLoader workers take steps round-robin; task augmentation is drawn per (seed, step, task).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metadist.data.episodes import labels, rotate_tasks, task_rotations, to_float
from metadist.data.format import check_format, decode_pool, decode_records
from metadist.data.store import ShardError, Store, locate, read_manifest


class Episodes:
    """A split's episodes in index order, gathered from the pool on demand (a 640-episode
    84x84 RGB 15-query test split is 1 GB of pixels: never held at once). len(); [i] or [a:b]
    -> uint8 (..., n, C, H, W); iterating gives one episode at a time."""

    def __init__(self, source: EpisodeSource, records: np.ndarray):
        self.source, self.records = source, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.source.gather(self.records[i])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def shape(self) -> tuple:
        return (len(self), self.records.shape[1], *self.source.image_shape)

    def first(self, n: int) -> Episodes:
        """The first n episodes."""
        return Episodes(self.source, self.records[:n])

    @property
    def episode(self) -> tuple[int, int, int]:
        """(ways, shots, queries) of every episode."""
        return self.source.ways, self.source.shots, self.source.queries


class EpisodeSource:
    """Random access to a split's episodes by global position, shard by shard (one cached), over
    its pool of images (read and checked once, on first use). `EpisodeSource(root, "train")` for
    a shards root (folder or URL prefix), or `EpisodeSource(folder)` for a local split folder."""

    def __init__(
        self, root: str | Path, split: str | None = None, seed: int = 0, cache_dir: str = ""
    ):
        if split is None:
            root, split = Path(root).parent, Path(root).name
        self.root, self.split = root, split
        self.dir = locate(root, split)
        self.manifest = read_manifest(root, split)
        check_format(self.manifest, self.dir)
        self.store = Store(root, cache_dir)
        self.store.check_sizes(split, self.manifest)
        self.seed = seed
        self.shards = self.manifest["shards"]
        self.counts = np.array([s["episodes"] for s in self.shards])
        self.size = int(self.counts.sum())
        self.ways, self.shots, self.queries = (
            self.manifest[k] for k in ("ways", "shots", "queries")
        )
        self.n = self.ways * (self.shots + self.queries)
        self.image_shape = tuple(self.manifest["image_shape"])
        self.class_images = self.manifest["class_images"]
        self.offsets = np.concatenate([[0], np.cumsum(self.class_images)]).astype(np.int64)
        self._pool: np.ndarray | None = None
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def pool(self) -> np.ndarray:
        """Every image of the split, (images, C, H, W) uint8, class after class."""
        if self._pool is None:
            parts, first = [], 0
            for entry in self.manifest["pool"]:
                data = self.store.read(self.split, entry)
                parts += decode_pool(
                    self.store.url(self.split, entry["name"]),
                    data,
                    first,
                    self.class_images,
                    self.image_shape,
                )
                first += entry["classes"]
            if first != len(self.class_images):
                raise ShardError(
                    f"{self.dir}: the pool holds {first} classes, the manifest lists "
                    f"{len(self.class_images)}"
                )
            self._pool = np.concatenate(parts)
        return self._pool

    def shard(self, j: int) -> np.ndarray:
        """The records of episode shard j: (episodes, n, 3) int32."""
        if self._cache is None or self._cache[0] != j:
            entry = self.shards[j]
            data = self.store.read(self.split, entry)
            self._cache = (
                j,
                decode_records(
                    self.store.url(self.split, entry["name"]),
                    data,
                    entry["episodes"],
                    self.n,
                    self.class_images,
                ),
            )
        return self._cache[1]

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """Every record in shard order as (pool index, quarter turns), (episodes, n) each, and
        where each shard starts in it (the device-resident reader's lookup table)."""
        recs = np.concatenate([self.shard(j) for j in range(len(self.shards))])
        return self.offsets[recs[..., 0]] + recs[..., 1], recs[..., 2]

    def gather(self, records: np.ndarray) -> np.ndarray:
        """Records (..., n, 3) -> their images (..., n, C, H, W) uint8, rotated as recorded."""
        x = self.pool[self.offsets[records[..., 0]] + records[..., 1]]
        k = records[..., 2]
        for turns in (1, 2, 3):
            m = k == turns
            if m.any():
                x[m] = np.rot90(x[m], turns, axes=(-2, -1))
        return x

    @lru_cache(maxsize=4)  # noqa: B019 (one source per split and process: the cache lives as long as it)
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, 11, epoch]).permutation(len(self.shards))
        starts = np.concatenate([[0], np.cumsum(self.counts[order])])
        return order, starts

    def locate(self, position: int) -> tuple[int, int]:
        """Global stream position -> (shard, episode within shard)."""
        epoch, offset = divmod(position, self.size)
        order, starts = self._epoch_order(epoch)
        slot = int(np.searchsorted(starts, offset, side="right") - 1)
        j = int(order[slot])
        within = np.random.default_rng([self.seed, 12, epoch, j]).permutation(int(self.counts[j]))
        return j, int(within[offset - starts[slot]])

    def episodes(self, positions) -> np.ndarray:
        recs = []
        for p in positions:
            j, i = self.locate(p)
            recs.append(self.shard(j)[i])
        return self.gather(np.stack(recs))

    def all(self, limit: int = 0) -> Episodes:
        """The split's episodes in index order (fixed val/test sets), gathered on demand."""
        n = self.size if not limit else min(limit, self.size)
        out, done = [], 0
        for j in range(len(self.shards)):
            if done >= n:
                break
            out.append(self.shard(j)[: n - done])
            done += len(out[-1])
        return Episodes(self, np.concatenate(out))


def to_batch(x, ways: int, shots: int, queries: int) -> dict[str, torch.Tensor]:
    """uint8 episodes (tasks, ways*(shots+queries), C, H, W), numpy or a tensor on any device ->
    float tensors split into support/query, on the same device."""
    # (tasks, ways*(shots+queries), C, H, W)
    x = to_float(torch.from_numpy(x) if isinstance(x, np.ndarray) else x)
    tasks, ns = x.shape[0], ways * shots
    return {
        "x_support": x[:, :ns],
        "y_support": labels(ways, shots).to(x.device).expand(tasks, -1),
        "x_query": x[:, ns:],
        "y_query": labels(ways, queries).to(x.device).expand(tasks, -1),
    }


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

    @property
    def share(self) -> int:
        if self.meta_batch_size % self.world_size:
            raise ValueError(
                f"meta_batch_size {self.meta_batch_size} does not split over {self.world_size} "
                "processes"
            )
        return self.meta_batch_size // self.world_size

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
        b = to_batch(x, self.source.ways, self.source.shots, self.source.queries)
        if self.spec.task_aug > 0:
            ks = task_rotations(self.spec.seed, step, self.tasks, self.spec.task_aug)
            b["x_support"], b["x_query"] = (
                rotate_tasks(b["x_support"], ks),
                rotate_tasks(b["x_query"], ks),
            )
        b["step"] = step
        return b

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.spec.start + k, self.spec.stop, n):
            yield self.batch_at(step)


class ResidentBatches(MetaBatches):
    """The same meta-batches as MetaBatches, from the split's pool and records held on
    `spec.device` (each shard read and checked once): a step is two index gathers and the
    recorded rotations, and the conversion to float and the task augmentation run on the device."""

    def __init__(self, source: EpisodeSource, spec: StreamSpec):
        super().__init__(source, spec)
        index, turns = source.table()
        self.starts = np.concatenate([[0], np.cumsum(source.counts)])
        self.pool = torch.from_numpy(source.pool).to(spec.device)
        self.index = torch.from_numpy(index).to(spec.device)
        self.turns = torch.from_numpy(turns.astype(np.int64)).to(spec.device)[..., None, None, None]

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        where = [self.source.locate(step * self.batch + t) for t in self.tasks]
        idx = torch.tensor([int(self.starts[j]) + i for j, i in where]).to(
            self.index.device, non_blocking=True
        )
        # (tasks, n, C, H, W), (tasks, n, 1, 1, 1)
        x, k = self.pool[self.index[idx]], self.turns[idx]
        # no host sync: a select, not a branch
        for turns in (1, 2, 3):
            x = torch.where(k == turns, torch.rot90(x, turns, dims=(-2, -1)), x)
        return self._finish(x, step)


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

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        n, share = len(self.labels), len(self.tasks)
        first = (step * self.batch + self.tasks.start) * self.group
        idx = np.array(
            [self._order(p // n)[p % n] for p in range(first, first + share * self.group)]
        )
        idx = idx.reshape(share, self.group)
        # (tasks, group, C, H, W)
        x = to_float(torch.from_numpy(self.source.pool[idx]))
        y = torch.from_numpy(self.labels[idx])
        if self.spec.task_aug > 0:
            x = rotate_tasks(
                x, task_rotations(self.spec.seed, step, self.tasks, self.spec.task_aug)
            )
        return {
            "x_support": x,
            "y_support": y,
            "x_query": x[:, :0],
            "y_query": y[:, :0],
            "step": step,
        }


def loader(ds: MetaBatches, num_workers: int):
    """An iterator over a batch reader: in this process, or from `num_workers` forked DataLoader
    workers (the pool is read and checked first, so they share it)."""
    _ = ds.source.pool
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


def meta_batches(source: EpisodeSource | str | Path, spec: StreamSpec):
    """Iterator over this rank's share of the episode meta-batches of `spec` (resident on
    `spec.device` when given). `source`: an EpisodeSource, or a local split folder."""
    if not isinstance(source, EpisodeSource):
        source = EpisodeSource(source, None, spec.seed)
    if spec.device is not None:  # the whole split resident on the device (no workers needed)
        return iter(ResidentBatches(source, spec))
    return loader(MetaBatches(source, spec), spec.num_workers)
