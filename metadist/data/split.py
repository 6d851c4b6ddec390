"""A split of shards read by index: `EpisodeSource` (its manifest, its pool read in place, each
episode's record; `all()`: the fixed val and test sets), `Episodes` (fixed or variable, gathered
on demand) and `pad_batch` for variable episodes. The splits of many sources, checked to mix, are
metadist/data/roots.py's `Sources`.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from metadist.data.episodes import labels, to_float
from metadist.data.format import (
    check_format,
    decode_pool,
    decode_records,
    decode_variable_records,
    map_pool,
)
from metadist.data.store import Access, MappedFile, ShardError, Store, locate, read_manifest


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
