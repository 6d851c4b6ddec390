"""Episode shards: the only webdataset import. Write a split as tar shards + manifest, and stream
it back as meta-batches that depend on (seed, step) only, never on the world size.

Format 2 (chosen by measurement, README "Your own dataset"): a split's images are stored once,
per class (`pool-NNNNNN.tar`: one sample per class, `images.npy` (n, C, H, W) uint8), and each
episode is an addressable record of which images it uses (`<split>-NNNNNN.tar`: one sample per
episode, `index.npy` (ways*(shots+queries), 3) int32: class, image, quarter turns). Arrays are
saved without pickle. `manifest.json` holds the spec, the class names and image counts, the image
shape, and every shard's size and sha256. A split is written in a temporary folder and renamed
when complete. An 84x84 RGB 5-way 1-shot 15-query episode is 1.7 MB of pixels but a 1 KB record.

Order: epoch e visits the episode shards in a permutation of (seed, e) and each shard's episodes
in a permutation of (seed, e, shard); global position p = step * meta_batch + task. Rank r of W
takes tasks [r*B/W, (r+1)*B/W) of every step, so the global batch is the same for any W.

Where shards live (`data.shards`): a local folder, or a URL prefix opened by WebDataset's own
URL openers (`http://`, `https://`, `pipe:COMMAND`; a `{}` in the prefix is replaced by the
path below it, e.g. `pipe:aws s3 cp s3://bucket/shards/{} -`), optionally through WebDataset's
file cache (`data.cache_dir`). Every shard (pool or episodes) is hashed as it is read and checked
against the manifest before a single array of it is decoded: altered bytes never reach training.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import urllib.parse
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.cache import FileCache
from webdataset.tariterators import group_by_keys, tar_file_expander

from metadist import __version__
from metadist.data.episodes import episode_rng, labels, rotate_tasks, sample_episode, task_rotations, to_float
from metadist.data.sources import ClassSet
from metadist.errors import MetadistError

FORMAT = 2
POOL_SHARD_BYTES = 256 * 2**20     # a pool shard holds whole classes, up to about this many bytes


class ShardError(MetadistError):
    """A shard is missing, truncated, corrupt, or holds something prepare never writes."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def is_remote(location: str | Path) -> bool:
    """A URL prefix (anything WebDataset opens by scheme) rather than a local folder."""
    loc = str(location)
    return loc.startswith("pipe:") or "://" in loc


def locate(root: str | Path, *parts: str) -> str:
    """The place of `parts` (split, file) under a shards root: a path, a URL, or a pipe command."""
    root, rel = str(root), "/".join(parts)
    if "{}" in root:
        return root.replace("{}", rel)
    if is_remote(root):
        return root.rstrip("/") + "/" + rel
    return str(Path(root, *parts))


_CURL = {6: "host not found", 7: "connection refused", 18: "transfer ended early", 22: "HTTP error (e.g. 404 not found)",
         28: "timed out", 35: "TLS handshake failed", 52: "empty reply", 56: "connection lost"}


def _why(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    for code, what in _CURL.items():
        if f"exit {code} " in text + " ":
            return f"{what}, curl exit {code}"
    return text[:200]


def _read_url(url: str) -> bytes:
    """All bytes at a URL or pipe command, through webdataset's gopen (curl for http(s))."""
    try:
        stream = wds.gopen(url)
        try:
            chunks = []
            while block := stream.read(1 << 20):
                chunks.append(block)
        finally:
            stream.close()
        return b"".join(chunks)
    except Exception as e:
        raise ShardError(f"cannot read {url} ({_why(e)})") from None


def read_manifest(root: str | Path, split: str | None = None) -> dict:
    """The manifest of `root/split` (or of the split folder `root` when split is None)."""
    loc = locate(root, split, "manifest.json") if split else locate(root, "manifest.json")
    if is_remote(loc):
        data = _read_url(loc)
    else:
        path = Path(loc)
        if not path.is_file():
            raise ShardError(f"{path.parent}: no manifest.json (run `metadist prepare` first)")
        data = path.read_bytes()
    try:
        return json.loads(data)
    except ValueError:
        raise ShardError(f"{loc}: not a metadist manifest (not JSON)") from None


class ShardReader:
    """Reads whole shards of one shards root, local or remote, and checks each against its
    manifest entry (size and sha256, computed as the bytes arrive) before anything decodes it."""

    def __init__(self, root: str | Path, cache_dir: str = ""):
        self.root, self.remote = str(root), is_remote(root)
        self.cache = FileCache(cache_dir, url_to_name=lambda u: urllib.parse.quote(u, safe="")[-200:],
                               validator=None) if cache_dir and self.remote else None

    def url(self, split: str, name: str) -> str:
        return locate(self.root, split, name)

    def check_sizes(self, split: str, manifest: dict) -> None:
        """At start: every local shard (pool and episodes) is there with the manifest's size
        (remote: checked on read)."""
        if self.remote:
            return
        for s in manifest.get("pool", []) + manifest["shards"]:
            path = Path(self.url(split, s["name"]))
            if not path.is_file():
                raise ShardError(f"shard missing: {path}")
            if path.stat().st_size != s["bytes"]:
                raise ShardError(f"shard truncated or altered: {path} has {path.stat().st_size} bytes, "
                                 f"manifest says {s['bytes']}")

    def read(self, split: str, entry: dict) -> bytes:
        url = self.url(split, entry["name"])
        try:
            return _checked(url, self._fetch(url), entry)
        except ShardError:          # a damaged cached copy: fetch it once more
            cached = Path(self.cache.cache_dir) / self.cache.url_to_name(url) if self.cache else None
            if cached is None or not cached.is_file():
                raise
            cached.unlink()
            return _checked(url, self._fetch(url), entry)

    def _fetch(self, url: str) -> bytes:
        if not self.remote:
            try:
                return Path(url).read_bytes()
            except FileNotFoundError:
                raise ShardError(f"shard missing: {url}") from None
        if self.cache is None:
            return _read_url(url)
        try:
            return Path(self.cache.get_file(url)).read_bytes()
        except Exception as e:
            raise ShardError(f"cannot read {url} ({_why(e)})") from None


def _checked(url: str, data: bytes, entry: dict) -> bytes:
    if len(data) != entry["bytes"]:
        raise ShardError(f"shard truncated or altered: {url} has {len(data)} bytes, manifest says {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardError(f"shard fails its checksum: {url}")
    return data


def verify(root: str | Path, split: str | None = None, manifest: dict | None = None, cache_dir: str = "") -> dict:
    """Read every shard of a split (pool and episodes) and check it against the manifest; name
    the first bad one."""
    if split is None:
        root, split = Path(root).parent, Path(root).name
    manifest = manifest or read_manifest(root, split)
    check_format(manifest, locate(root, split))
    reader = ShardReader(root, cache_dir)
    reader.check_sizes(split, manifest)
    for s in manifest.get("pool", []) + manifest["shards"]:
        reader.read(split, s)
    return manifest


def check_format(manifest: dict, where: str) -> None:
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{where}: shards of format {manifest.get('format')!r} (metadist {manifest.get('metadist_version', '?')}); "
                         f"this metadist reads format {FORMAT}: prepare the split again into a new folder "
                         "(`metadist prepare` with data.shards unset picks one)")


def _tar_writer(path: Path):
    return wds.TarWriter(str(path), encoder=False, mtime=0.0, user="metadist", group="metadist", mode=0o444)


def _shard_entries(folder: Path, pattern: str, counts: list[int], key: str) -> list[dict]:
    return [{"name": p.name, key: c, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p, c in zip(sorted(folder.glob(pattern)), counts)]


def write_split(out: Path, split: str, classes: ClassSet, spec: dict, log=print, info: dict | None = None) -> dict:
    """Write (or reuse: same `spec`, every shard intact) `out/<split>/`: the split's classes as
    pool shards, its episodes as records; `info` goes into the manifest as well, without deciding
    reuse. Returns the manifest. Same spec + data -> same bytes."""
    final = Path(out) / split
    if (final / "manifest.json").is_file():
        old = read_manifest(final)
        if {k: old.get(k) for k in spec} == spec:
            try:
                verify(out, split, old)
                log(f"{final}: up to date ({old['episodes']} episodes, {len(old['shards'])} shards), skipped")
                return old
            except ShardError as e:
                log(f"{final}: {e}; rebuilding")
        else:
            log(f"{final}: manifest differs from the requested split; rebuilding")
    tmp = Path(out) / f".{split}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids = classes.splits[split]
    sizes = [len(classes.images[c]) for c in ids]
    shape = list(classes.images[ids[0]].shape[1:])
    if spec.get("image_shape", shape) != shape:
        raise ValueError(f"{split}: images are {shape} after preprocessing, the spec says {spec['image_shape']}")
    # the pool: whole classes per shard, a new shard when the next class would pass POOL_SHARD_BYTES
    groups, size = [[]], 0
    for k, c in enumerate(ids):
        nbytes = classes.images[c].nbytes
        if groups[-1] and size + nbytes > POOL_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    for j, group in enumerate(groups):
        with _tar_writer(tmp / f"pool-{j:06d}.tar") as sink:
            for k in group:
                sink.write({"__key__": f"{k:06d}", "images.npy": _npy_bytes(classes.images[ids[k]])})
    ways, shots, queries = spec["ways"], spec["shots"], spec["queries"]
    rotations = classes.rotations[split]
    with wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=spec["episodes_per_shard"], maxsize=1e12, verbose=0,
                         encoder=False, mtime=0.0, user="metadist", group="metadist", mode=0o444) as sink:
        for i in range(spec["episodes"]):
            record = sample_episode(sizes, rotations, ways, shots, queries, episode_rng(spec["seed"], split, i), split)
            sink.write({"__key__": f"{i:08d}", "index.npy": _npy_bytes(record)})
    per = spec["episodes_per_shard"]
    counts = [min(per, spec["episodes"] - j * per) for j in range(-(-spec["episodes"] // per))]
    shards = _shard_entries(tmp, f"{split}-*.tar", counts, "episodes")
    pool = _shard_entries(tmp, "pool-*.tar", [len(g) for g in groups], "classes")
    manifest = dict(spec, **(info or {}), image_shape=shape, classes=[classes.names[c] for c in ids], class_images=sizes,
                    rotations_deg=[k * 90 for k in rotations], pool=pool, shards=shards,
                    images_per_episode=ways * (shots + queries), pool_bytes=sum(s["bytes"] for s in pool),
                    bytes=sum(s["bytes"] for s in shards + pool), metadist_version=__version__)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log(f"{final}: wrote {len(ids)} classes ({sum(sizes)} images, {manifest['pool_bytes'] / 1e6:.1f} MB) and "
        f"{spec['episodes']} episodes in {len(shards)} shards ({sum(s['bytes'] for s in shards) / 1e6:.1f} MB)")
    return manifest


def _samples(url: str, data: bytes, member: str) -> list[tuple[str, np.ndarray]]:
    """(key, array) of every sample of one (checked) shard, in key order; only `member` (an .npy
    saved without pickle) may be in a sample."""
    try:
        raw = list(group_by_keys(tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])))
    except Exception as e:
        raise ShardError(f"shard unreadable: {url} ({str(e).splitlines()[0][:200]})") from None
    out = []
    for sample in raw:
        extra = set(sample) - {"__key__", "__url__", "__local_path__", member}
        if extra:
            raise ShardError(f"{url}: unexpected member(s) {sorted(extra)} in sample {sample.get('__key__')}")
        try:
            out.append((sample["__key__"], np.load(io.BytesIO(sample[member]), allow_pickle=False)))
        except (KeyError, ValueError) as e:
            raise ShardError(f"{url}: sample {sample.get('__key__')} cannot be decoded ({e})") from None
    return out


def decode_records(url: str, data: bytes, expected: int, n: int, class_images: list[int]) -> np.ndarray:
    """The episode records of one episode shard: (episodes, n, 3) int32, each checked to point
    inside the pool (a record that does not is a damaged or foreign shard)."""
    samples = _samples(url, data, "index.npy")
    if len(samples) != expected:
        raise ShardError(f"shard {url}: {len(samples)} episodes, manifest says {expected}")
    recs = np.stack([a for _, a in samples]) if samples else np.zeros((0, n, 3), np.int32)
    if recs.dtype != np.int32 or recs.shape[1:] != (n, 3):
        raise ShardError(f"{url}: episode records are {recs.dtype} {recs.shape[1:]}, expected int32 ({n}, 3)")
    sizes = np.asarray(class_images)
    c, m, k = recs[..., 0], recs[..., 1], recs[..., 2]
    if (c < 0).any() or (c >= len(sizes)).any() or (m < 0).any() or (m >= sizes[np.clip(c, 0, len(sizes) - 1)]).any() \
            or (k < 0).any() or (k > 3).any():
        raise ShardError(f"{url}: an episode record points outside the split's {len(sizes)} classes")
    return recs


def decode_pool(url: str, data: bytes, first: int, class_images: list[int], shape: tuple) -> list[np.ndarray]:
    """The classes of one pool shard, starting at class `first`, each checked against the manifest."""
    out = []
    for i, (key, a) in enumerate(_samples(url, data, "images.npy")):
        k = first + i
        want = (class_images[k], *shape) if k < len(class_images) else None
        if a.dtype != np.uint8 or a.shape != want or key != f"{k:06d}":
            raise ShardError(f"{url}: class sample {key} is {a.dtype} {a.shape}, the manifest says uint8 {want}")
        out.append(a)
    return out


class Episodes:
    """A split's episodes in index order, gathered from the pool on demand (a 640-episode
    84x84 RGB 15-query test split is 1 GB of pixels: never held at once). len(); [i] or [a:b]
    -> uint8 (..., n, C, H, W); iterating gives one episode at a time."""

    def __init__(self, source: "EpisodeSource", records: np.ndarray):
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


class EpisodeSource:
    """Random access to a split's episodes by global position, shard by shard (one cached), over
    its pool of images (read and checked once, on first use). `EpisodeSource(root, "train")` for
    a shards root (folder or URL prefix), or `EpisodeSource(folder)` for a local split folder."""

    def __init__(self, root: str | Path, split: str | None = None, seed: int = 0, cache_dir: str = ""):
        if split is None:
            root, split = Path(root).parent, Path(root).name
        self.root, self.split = root, split
        self.dir = locate(root, split)
        self.manifest = read_manifest(root, split)
        check_format(self.manifest, self.dir)
        self.reader = ShardReader(root, cache_dir)
        self.reader.check_sizes(split, self.manifest)
        self.seed = seed
        self.shards = self.manifest["shards"]
        self.counts = np.array([s["episodes"] for s in self.shards])
        self.size = int(self.counts.sum())
        self.ways, self.shots, self.queries = (self.manifest[k] for k in ("ways", "shots", "queries"))
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
                data = self.reader.read(self.split, entry)
                parts += decode_pool(self.reader.url(self.split, entry["name"]), data, first, self.class_images,
                                     self.image_shape)
                first += entry["classes"]
            if first != len(self.class_images):
                raise ShardError(f"{self.dir}: the pool holds {first} classes, the manifest lists {len(self.class_images)}")
            self._pool = np.concatenate(parts)
        return self._pool

    def shard(self, j: int) -> np.ndarray:
        """The records of episode shard j: (episodes, n, 3) int32."""
        if self._cache is None or self._cache[0] != j:
            entry = self.shards[j]
            data = self.reader.read(self.split, entry)
            self._cache = (j, decode_records(self.reader.url(self.split, entry["name"]), data, entry["episodes"], self.n,
                                             self.class_images))
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

    @lru_cache(maxsize=4)
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
    x = to_float(torch.from_numpy(x) if isinstance(x, np.ndarray) else x)   # (tasks, ways*(shots+queries), C, H, W)
    tasks, ns = x.shape[0], ways * shots
    return {"x_support": x[:, :ns], "y_support": labels(ways, shots).to(x.device).expand(tasks, -1),
            "x_query": x[:, ns:], "y_query": labels(ways, queries).to(x.device).expand(tasks, -1)}


class MetaBatches(IterableDataset):
    """Rank `rank`'s share of the global meta-batches for steps [start, stop), in step order.

    DataLoader workers take steps round-robin (worker k: start+k, start+k+n, ...), which the
    DataLoader yields back in order. Task augmentation is drawn per (seed, step, global task).
    """

    def __init__(self, source: EpisodeSource, seed: int, meta_batch_size: int, rank: int, world_size: int,
                 start: int, stop: int, task_aug: float = 0.0):
        if meta_batch_size % world_size:
            raise ValueError(f"meta_batch_size {meta_batch_size} does not split over {world_size} processes")
        self.seed, self.batch = seed, meta_batch_size
        self.share = meta_batch_size // world_size
        self.first = rank * self.share
        self.start, self.stop, self.task_aug = start, stop, task_aug
        self.source = source

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        tasks = range(self.first, self.first + self.share)
        x = self.source.episodes([step * self.batch + t for t in tasks])
        return self._finish(x, step, tasks)

    def _finish(self, x, step: int, tasks: range) -> dict[str, torch.Tensor]:
        """uint8 episodes of this rank's tasks (numpy, or a tensor on any device) -> the step's batch,
        task augmentation applied where the episodes are."""
        b = to_batch(x, self.source.ways, self.source.shots, self.source.queries)
        if self.task_aug > 0:
            ks = task_rotations(self.seed, step, tasks, self.task_aug)
            b["x_support"], b["x_query"] = rotate_tasks(b["x_support"], ks), rotate_tasks(b["x_query"], ks)
        b["step"] = step
        return b

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + k, self.stop, n):
            yield self.batch_at(step)


class ResidentBatches(MetaBatches):
    """The same meta-batches as MetaBatches, from the split's pool and records held on `device`
    (each shard read and checked once): a step is two index gathers and the recorded rotations,
    and the conversion to float and the task augmentation run on the device."""

    def __init__(self, source: EpisodeSource, seed: int, meta_batch_size: int, rank: int, world_size: int,
                 start: int, stop: int, task_aug: float = 0.0, device: torch.device | str = "cpu"):
        super().__init__(source, seed, meta_batch_size, rank, world_size, start, stop, task_aug)
        index, turns = source.table()
        self.starts = np.concatenate([[0], np.cumsum(source.counts)])
        self.pool = torch.from_numpy(source.pool).to(device)
        self.index = torch.from_numpy(index).to(device)
        self.turns = torch.from_numpy(turns.astype(np.int64)).to(device)[..., None, None, None]

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        tasks = range(self.first, self.first + self.share)
        where = [self.source.locate(step * self.batch + t) for t in tasks]
        idx = torch.tensor([int(self.starts[j]) + i for j, i in where]).to(self.index.device, non_blocking=True)
        x, k = self.pool[self.index[idx]], self.turns[idx]                  # (tasks, n, C, H, W), (tasks, n, 1, 1, 1)
        for turns in (1, 2, 3):                                              # no host sync: a select, not a branch
            x = torch.where(k == turns, torch.rot90(x, turns, dims=(-2, -1)), x)
        return self._finish(x, step, tasks)


class ClassBatches(MetaBatches):
    """Supervised pre-training (algo.name=pretrain): each of a step's meta_batch_size "tasks" is a
    group of `group` images from the whole split, labelled by their class (0 .. classes-1), as
    y_support (the query is empty). Epoch e visits the split's images in a permutation of
    (seed, e); group g of the global stream holds images [g*group, (g+1)*group). Like the episode
    stream, it depends on (seed, step) only: the same for any world size."""

    def __init__(self, source: EpisodeSource, seed: int, meta_batch_size: int, rank: int, world_size: int,
                 start: int, stop: int, group: int, task_aug: float = 0.0):
        super().__init__(source, seed, meta_batch_size, rank, world_size, start, stop, task_aug)
        self.group = group
        self.labels = np.repeat(np.arange(len(source.class_images)), source.class_images)

    @lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 13, epoch]).permutation(len(self.labels))

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        tasks = range(self.first, self.first + self.share)
        n = len(self.labels)
        first = (step * self.batch + self.first) * self.group
        idx = np.array([self._order(p // n)[p % n] for p in range(first, first + self.share * self.group)])
        idx = idx.reshape(self.share, self.group)
        x = to_float(torch.from_numpy(self.source.pool[idx]))                  # (tasks, group, C, H, W)
        y = torch.from_numpy(self.labels[idx])
        if self.task_aug > 0:
            x = rotate_tasks(x, task_rotations(self.seed, step, tasks, self.task_aug))
        return {"x_support": x, "y_support": y, "x_query": x[:, :0], "y_query": y[:, :0], "step": step}


def meta_batches(split_dir, seed: int, meta_batch_size: int, rank: int, world_size: int, start: int, stop: int,
                 task_aug: float = 0.0, num_workers: int = 0, cache_dir: str = "", device=None, pretrain_group: int = 0):
    """Iterator over this rank's share of steps start..stop-1 (see MetaBatches; with
    `pretrain_group`, ClassBatches of that many images). `split_dir`: an EpisodeSource, or a local
    split folder."""
    if not isinstance(split_dir, EpisodeSource):
        split_dir = EpisodeSource(split_dir, None, seed, cache_dir)
    if device is not None and not pretrain_group:       # the whole split resident on `device` (no workers needed)
        return iter(ResidentBatches(split_dir, seed, meta_batch_size, rank, world_size, start, stop, task_aug, device))
    split_dir.pool                # read and checked once, before workers fork (they share it)
    ds = (ClassBatches(split_dir, seed, meta_batch_size, rank, world_size, start, stop, pretrain_group, task_aug)
          if pretrain_group else MetaBatches(split_dir, seed, meta_batch_size, rank, world_size, start, stop, task_aug))
    if num_workers == 0:
        return iter(ds)
    return iter(DataLoader(ds, batch_size=None, num_workers=num_workers, prefetch_factor=4,
                           multiprocessing_context="fork" if os.name == "posix" else None))
