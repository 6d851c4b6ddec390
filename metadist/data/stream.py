"""Episodes back from shards: a split's episodes by index (`EpisodeSource.all()`: the fixed val and
test sets) and the train stream as meta-batches that depend on (seed, step) only, never on the
world size (`meta_batches(source, spec)`).

Order: epoch e visits the episode shards in a permutation of (seed, e) and each shard's episodes
in a permutation of (seed, e, shard); global position p = step * meta_batch + task. Rank r of W
takes tasks [r*B/W, (r+1)*B/W) of every step, so the global batch is the same for any W.
DataLoader workers take steps round-robin; task augmentation is drawn per (seed, step, task).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metadist.data.episodes import labels, rotate_tasks, task_rotations, to_float
from metadist.data.format import (
    check_format,
    decode_pool,
    decode_records,
    decode_variable_records,
    map_pool,
)
from metadist.data.store import Access, MappedFile, ShardError, Store, locate, read_manifest


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
        return type(self)(self.source, self.records[:n])

    @property
    def episode(self) -> tuple[int, int, int]:
        """(ways, shots, queries) of every episode."""
        return self.source.ways, self.source.shots, self.source.queries

    def batch(self, a: int, b: int) -> dict[str, torch.Tensor]:
        """Episodes a..b-1 as one batch of float tensors (to_batch)."""
        return to_batch(self[a:b], *self.episode)


class VariableEpisodes(Episodes):
    """A split's variable episodes (Meta-Dataset's: ways, shots and queries vary): `records` is a
    list of (n_i, 5) records; batch(a, b) pads episodes a..b-1 to their largest (pad_batch)."""

    def __getitem__(self, i):
        return self.source.gather(self.records[i][:, :3])

    @property
    def shape(self) -> tuple:
        raise TypeError("variable episodes have no one shape")

    @property
    def episode(self) -> tuple[int, int, int]:
        raise TypeError("variable episodes have no one (ways, shots, queries)")

    def batch(self, a: int, b: int) -> dict[str, torch.Tensor]:
        return pad_batch(self.records[a:b], self.source.gather)


def pad_batch(records: list, gather) -> dict[str, torch.Tensor]:
    """Variable episodes (records (n_i, 5): class, image, turns, label, part) -> one batch padded
    to its largest: x_support (T, S, C, H, W) float, y_support (T, S) long with -1 on the padding
    rows; x_query, y_query likewise; ways (T,) long, each task's number of classes. `gather`: the
    split's gather, or one per record (episodes of several sources)."""
    support = [r[r[:, 4] == 0] for r in records]
    query = [r[r[:, 4] == 1] for r in records]
    if callable(gather):
        images = gather(np.concatenate([r[:, :3] for r in support + query]))  # (rows, C, H, W)
    else:
        images = np.concatenate(
            [g(r[:, :3]) for g, r in zip(gather, support)]
            + [g(r[:, :3]) for g, r in zip(gather, query)]
        )
    out, k = {}, 0
    for name, parts in (("support", support), ("query", query)):
        rows = max(len(p) for p in parts)
        x = np.zeros((len(parts), rows, *images.shape[1:]), np.uint8)
        y = np.full((len(parts), rows), -1, np.int64)
        for t, p in enumerate(parts):
            x[t, : len(p)], y[t, : len(p)] = images[k : k + len(p)], p[:, 3]
            k += len(p)
        out[f"x_{name}"], out[f"y_{name}"] = to_float(torch.from_numpy(x)), torch.from_numpy(y)
    out["ways"] = torch.tensor([int(r[:, 3].max()) + 1 for r in records])
    return out


class MappedPool:
    """A split's images, (images, C, H, W) uint8, class after class, read in place from its pool
    shards through read-only memory maps (metadist.data.store.MappedFile): no private copy, no
    decode, and every process of a node shares the page cache's one copy. Indexing it with an
    array of image indices gathers those images into a fresh array, as an in-memory pool's fancy
    indexing does."""

    def __init__(self, files: list, classes: list[np.ndarray], shape: tuple):
        self.files, self.classes = files, classes  # MappedFile, (n_c, C, H, W) views
        self.offsets = np.concatenate([[0], np.cumsum([len(c) for c in classes])]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), *shape)
        self.dtype = np.dtype(np.uint8)
        self.nbytes = int(np.prod(self.shape))
        self.unleased = [f for f in files if not f.leased]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        for f in self.unleased:  # no lease to hold a writer back: a page may vanish under a copy
            if why := f.changed():
                raise ShardError(why)
        index = np.asarray(index)
        flat = index.reshape(-1)
        cls = np.searchsorted(self.offsets, flat, side="right") - 1
        within = flat - self.offsets[cls]
        out = np.empty((len(flat), *self.shape[1:]), np.uint8)
        for j, (c, i) in enumerate(zip(cls.tolist(), within.tolist())):
            out[j] = self.classes[c][i]
        return out.reshape(*index.shape, *self.shape[1:])

    def array(self) -> np.ndarray:
        """All images in one private array (the device-resident reader copies it to the device)."""
        return np.concatenate(self.classes) if self.classes else np.zeros(self.shape, np.uint8)


class EpisodeSource:
    """Random access to a split's episodes by global position, shard by shard (one cached), over
    its pool of images (checked and mapped, or read, on first use). `EpisodeSource(root, "train")`
    for a shards root (folder or URL prefix), or `EpisodeSource(folder)` for a local split folder;
    `access` (metadist.data.store.Access) says how its files are reached."""

    def __init__(
        self, root: str | Path, split: str | None = None, seed: int = 0, access: Access = Access()
    ):
        if split is None:
            root, split = Path(root).parent, Path(root).name
        self.root, self.split = root, split
        self.dir = locate(root, split)
        self.manifest = read_manifest(root, split)
        check_format(self.manifest, self.dir)
        self.store = Store(root, access)
        self.store.check_sizes(split, self.manifest)
        self.seed, self.access = seed, access
        self.shards = self.manifest["shards"]
        self.counts = np.array([s["episodes"] for s in self.shards])
        self.size = int(self.counts.sum())
        self.ways, self.shots, self.queries = (
            self.manifest[k] for k in ("ways", "shots", "queries")
        )
        self.variable = self.manifest.get("episode") == "variable"
        self.n = None if self.variable else self.ways * (self.shots + self.queries)
        self.image_shape = tuple(self.manifest["image_shape"])
        self.class_images = self.manifest["class_images"]
        self.offsets = np.concatenate([[0], np.cumsum(self.class_images)]).astype(np.int64)
        self._pool: np.ndarray | MappedPool | None = None
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def pool(self) -> np.ndarray | MappedPool:
        """Every image of the split, (images, C, H, W) uint8, class after class: mapped in place
        (data.pool=mmap, the files local or in this node's cache), else a private copy."""
        if self._pool is None:
            t, entries = time.perf_counter(), self.manifest["pool"]
            places = (
                [self.store.local_path(self.split, e) for e in entries]
                if self.access.pool == "mmap"
                else []
            )
            if places and all(path is not None for path, _ in places):
                self._pool = self._mapped([path for path, _ in places])
                hashed = sum(n for _, n in places)
                if hashed:
                    s = time.perf_counter() - t
                    self.store.say(
                        f"{self.dir}: checked {hashed / 1e6:.1f} MB of pool shards in {s:.1f} s "
                        f"({hashed / 1e6 / max(s, 1e-9):.0f} MB/s); later starts on this node skip "
                        "it"
                    )
            else:
                self._pool = self._in_memory()
        return self._pool

    def _mapped(self, paths: list[Path]) -> MappedPool:
        files, classes, first = [], [], 0
        for path, entry in zip(paths, self.manifest["pool"]):
            f = MappedFile(path)
            files.append(f)
            classes += map_pool(path, f.buffer, first, self.class_images, self.image_shape)
            first += entry["classes"]
        self._check_classes(first)
        return MappedPool(files, classes, self.image_shape)

    def _in_memory(self) -> np.ndarray:
        if self.store.remote and self.access.pool == "mmap":
            self.store.say(
                f"{self.dir}: data.cache_dir is unset, so this process reads its own copy of the "
                f"pool ({self.manifest.get('pool_bytes', 0) / 1e6:.0f} MB) into memory; set "
                "data.cache_dir to fetch it once per node and share it"
            )
        parts, first = [], 0
        for entry in self.manifest["pool"]:
            data = self.store.read(self.split, entry)
            url = self.store.url(self.split, entry["name"])
            parts += decode_pool(url, data, first, self.class_images, self.image_shape)
            first += entry["classes"]
        self._check_classes(first)
        return np.concatenate(parts)

    def _check_classes(self, found: int) -> None:
        if found != len(self.class_images):
            raise ShardError(
                f"{self.dir}: the pool holds {found} classes, the manifest lists "
                f"{len(self.class_images)}"
            )

    def shard(self, j: int) -> np.ndarray | list:
        """The records of episode shard j: (episodes, n, 3) int32, or for variable episodes a
        list of (n_i, 5) int32."""
        if self._cache is None or self._cache[0] != j:
            entry = self.shards[j]
            data = self.store.read(self.split, entry)
            url = self.store.url(self.split, entry["name"])
            if self.variable:
                recs = decode_variable_records(url, data, entry["episodes"], self.class_images)
            else:
                recs = decode_records(url, data, entry["episodes"], self.n, self.class_images)
            self._cache = (j, recs)
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

    def records_at(self, positions) -> list:
        """The records at these stream positions."""
        recs = []
        for p in positions:
            j, i = self.locate(p)
            recs.append(self.shard(j)[i])
        return recs

    def episodes(self, positions) -> np.ndarray:
        """The (fixed) episodes at these stream positions: uint8 (len, n, C, H, W)."""
        return self.gather(np.stack(self.records_at(positions)))

    def all(self, limit: int = 0) -> Episodes:
        """The split's episodes in index order (fixed val/test sets), gathered on demand."""
        n = self.size if not limit else min(limit, self.size)
        out, done = [], 0
        for j in range(len(self.shards)):
            if done >= n:
                break
            out.append(self.shard(j)[: n - done])
            done += len(out[-1])
        if self.variable:
            return VariableEpisodes(self, [r for part in out for r in part])
        return Episodes(self, np.concatenate(out))


def source_names(roots: list) -> list[str]:
    """A short name per source (data.sources): its folder's or URL's last part, numbered where two
    are alike."""
    names = [str(r).rstrip("/").rsplit("/", 1)[-1] or str(r) for r in roots]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def open_sources(roots: list, split: str, seed: int = 0, access: Access = Access()) -> list:
    """`split` of every source, checked to mix in one run: images of one shape, episodes of one
    kind (variable, or fixed of one ways/shots/queries). A source that does not mix is one
    ShardError naming it."""
    out = [EpisodeSource(r, split, seed, access) for r in roots]
    first, names = out[0], source_names(roots)

    def kind(s: EpisodeSource) -> str:
        return "variable" if s.variable else f"{s.ways}-way {s.shots}-shot {s.queries}-query"

    for name, s in zip(names[1:], out[1:]):
        if s.image_shape != first.image_shape:
            raise ShardError(
                f"data.sources: {name} has images of shape {list(s.image_shape)}, {names[0]} "
                f"{list(first.image_shape)}: prepare every source at one data.image_size and "
                "data.channels"
            )
        if kind(s) != kind(first):
            raise ShardError(
                f"data.sources: {name} has {kind(s)} episodes, {names[0]} {kind(first)}: prepare "
                "every source with the same data.episode (variable, or one ways/shots/queries)"
            )
    return out


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
    source_weights: tuple = ()  # many sources: each task's source drawn by these (uniform: ())

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


class VariableBatches(MetaBatches):
    """The same stream as MetaBatches over a split of variable episodes: each step's episodes
    padded to their largest (pad_batch), with task augmentation on the padded images."""

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        recs = self.source.records_at([step * self.batch + t for t in self.tasks])
        b = pad_batch(recs, self.source.gather)
        if self.spec.task_aug > 0:
            ks = task_rotations(self.spec.seed, step, self.tasks, self.spec.task_aug)
            b["x_support"], b["x_query"] = (
                rotate_tasks(b["x_support"], ks),
                rotate_tasks(b["x_query"], ks),
            )
        b["step"] = step
        return b


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
        if self.spec.task_aug > 0:
            ks = task_rotations(self.spec.seed, step, self.tasks, self.spec.task_aug)
            b["x_support"], b["x_query"] = (
                rotate_tasks(b["x_support"], ks),
                rotate_tasks(b["x_query"], ks),
            )
        b["source"] = torch.nn.functional.one_hot(
            torch.from_numpy(src[self.tasks.start : self.tasks.stop]), len(self.sources)
        ).float()
        b["step"] = step
        return b


class ResidentBatches(MetaBatches):
    """The same meta-batches as MetaBatches, from the split's pool and records held on
    `spec.device` (each shard read and checked once): a step is two index gathers and the
    recorded rotations, and the conversion to float and the task augmentation run on the device."""

    def __init__(self, source: EpisodeSource, spec: StreamSpec):
        super().__init__(source, spec)
        index, turns = source.table()
        self.starts = np.concatenate([[0], np.cumsum(source.counts)])
        pool = source.pool
        self.pool = torch.from_numpy(pool.array() if isinstance(pool, MappedPool) else pool).to(
            spec.device
        )
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


def meta_batches(source, spec: StreamSpec, weights: list[float] | None = None):
    """Iterator over this rank's share of the episode meta-batches of `spec` (resident on
    `spec.device` when given). `source`: an EpisodeSource, or a local split folder; or a list of
    EpisodeSources (many sources: MixedBatches, each task's source drawn by `weights`, uniform if
    None)."""
    if isinstance(source, list):
        if len(source) > 1:
            w = weights or list(spec.source_weights) or [1.0] * len(source)
            return loader(MixedBatches(source, w, spec), spec.num_workers)
        source = source[0]
    if not isinstance(source, EpisodeSource):
        source = EpisodeSource(source, None, spec.seed)
    if source.variable:  # padded on the host, step by step
        return loader(VariableBatches(source, spec), spec.num_workers)
    if spec.device is not None:  # the whole split resident on the device (no workers needed)
        return iter(ResidentBatches(source, spec))
    return loader(MetaBatches(source, spec), spec.num_workers)


def fits_device(nbytes: int, device, mode: str, fraction: float, free: int | None = None) -> bool:
    """data.device_cache: `on` | `off` | `auto`: on a CUDA device whose free memory (or `free`)
    times `fraction` (data.device_cache_fraction) holds the split's `nbytes` (pool and records)."""
    if mode != "auto":
        return mode == "on"
    if getattr(device, "type", device) != "cuda":
        return False
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return nbytes <= fraction * free


_END = object()


class Prefetch:
    """Batches moved to `device` ahead of their use, for a split too big to keep on the device: a
    thread gathers each batch on the host, pins it and copies it without blocking on a side CUDA
    stream, `depth` batches ahead, while the steps run; a step's stream waits for its own batch
    only. On a CPU the move is the identity, so the ordering, the depth and the errors (a failing
    gather is raised in the consumer) are what a CPU test checks."""

    def __init__(self, batches, device, depth: int = 2):
        self.batches, self.device, self.depth = batches, torch.device(device), depth
        self.cuda = self.device.type == "cuda"

    def _move(self, batch: dict, stream) -> tuple:
        if not self.cuda:
            return batch, None, None
        with torch.cuda.stream(stream):
            host = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            moved = {
                k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in host.items()
            }
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done, host  # the pinned host copy lives until the copy is done

    def _ready(self, item: tuple) -> dict:
        batch, done, _ = item
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for v in batch.values():
                if torch.is_tensor(v):
                    v.record_stream(current)
        return batch

    def __iter__(self):
        q, stop = queue.Queue(maxsize=self.depth), threading.Event()

        def work():
            try:
                stream = torch.cuda.Stream(self.device) if self.cuda else None
                for b in self.batches:
                    if stop.is_set():
                        return
                    q.put(self._move(b, stream))
                q.put(_END)
            except BaseException as e:  # raised again in the consumer
                q.put(e)

        worker = threading.Thread(target=work, name="metadist-prefetch", daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield self._ready(item)
        finally:
            stop.set()
            while worker.is_alive():
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)
