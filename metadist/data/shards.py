"""Episode shards: the only webdataset import. Write a split's episodes as tar shards + manifest,
and stream them back as meta-batches that depend on (seed, step) only, never on the world size.

One sample = one episode: `images.npy` (ways*(shots+queries), 28, 28) uint8, saved without
pickle, and `classes.json`. A split folder holds `<split>-NNNNNN.tar` and `manifest.json` (with
every shard's size and sha256); it is written in a temporary folder and renamed when complete.
Order: epoch e visits the shards in a permutation of (seed, e) and each shard's episodes in a
permutation of (seed, e, shard); global position p = step * meta_batch + task. Rank r of W takes
tasks [r*B/W, (r+1)*B/W) of every step, so the global batch is the same for any W.

Where shards live (`data.shards`): a local folder, or a URL prefix opened by WebDataset's own
URL openers (`http://`, `https://`, `pipe:COMMAND`; a `{}` in the prefix is replaced by the
path below it, e.g. `pipe:aws s3 cp s3://bucket/shards/{} -`), optionally through WebDataset's
file cache (`data.cache_dir`). Every shard is hashed as it is read and checked against the
manifest before a single episode of it is decoded: altered bytes never reach training.
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
from metadist.data.omniglot import Split
from metadist.errors import MetadistError

FORMAT = 1


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


def split_spec(split: Split, names: list[tuple[str, str, str]], protocol: str, ways: int, shots: int,
               queries: int, episodes: int, episodes_per_shard: int, seed: int, source: dict) -> dict:
    """Everything that determines a split's bytes; a manifest whose spec matches can be reused."""
    return {
        "format": FORMAT, "split": split.name, "protocol": protocol, "ways": ways, "shots": shots,
        "queries": queries, "episodes": episodes, "episodes_per_shard": episodes_per_shard, "seed": seed,
        "rotations_deg": [k * 90 for k in split.rotations], "source": source,
        "characters": ["/".join(names[c]) for c in split.chars],
    }


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
        """At start: every local shard is there with the manifest's size (remote: checked on read)."""
        if self.remote:
            return
        for s in manifest["shards"]:
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
    """Read every shard of a split and check it against the manifest; name the first bad one."""
    if split is None:
        root, split = Path(root).parent, Path(root).name
    manifest = manifest or read_manifest(root, split)
    reader = ShardReader(root, cache_dir)
    reader.check_sizes(split, manifest)
    for s in manifest["shards"]:
        reader.read(split, s)
    return manifest


def write_split(out: Path, split: Split, images: np.ndarray, names: list[tuple[str, str, str]], spec: dict,
                log=print) -> dict:
    """Write (or reuse) `out/<split>/`. Returns the manifest. Same spec + data -> same bytes."""
    final = Path(out) / split.name
    if (final / "manifest.json").is_file():
        old = read_manifest(final)
        if {k: old.get(k) for k in spec} == spec:
            try:
                verify(out, split.name, old)
                log(f"{final}: up to date ({old['episodes']} episodes, {len(old['shards'])} shards), skipped")
                return old
            except ShardError as e:
                log(f"{final}: {e}; rebuilding")
        else:
            log(f"{final}: manifest differs from the requested split; rebuilding")
    tmp = Path(out) / f".{split.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ways, shots, queries = spec["ways"], spec["shots"], spec["queries"]
    pattern = str(tmp / f"{split.name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=spec["episodes_per_shard"], maxsize=1e12, verbose=0,
                         encoder=False, mtime=0.0, user="metadist", group="metadist", mode=0o444) as sink:
        for i in range(spec["episodes"]):
            x, classes = sample_episode(images, split, ways, shots, queries, episode_rng(spec["seed"], split.name, i))
            meta = {"index": i, "classes": [{"set": names[c][0], "alphabet": names[c][1], "character": names[c][2],
                                             "rotation": k * 90} for c, k in classes]}
            sink.write({"__key__": f"{i:08d}", "images.npy": _npy_bytes(x),
                        "classes.json": json.dumps(meta, sort_keys=True).encode()})
    shards = []
    for j, path in enumerate(sorted(tmp.glob("*.tar"))):
        count = min(spec["episodes_per_shard"], spec["episodes"] - j * spec["episodes_per_shard"])
        shards.append({"name": path.name, "episodes": count, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    manifest = dict(spec, shards=shards, images_per_episode=ways * (shots + queries),
                    bytes=sum(s["bytes"] for s in shards), metadist_version=__version__)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log(f"{final}: wrote {spec['episodes']} episodes in {len(shards)} shards ({manifest['bytes'] / 1e6:.1f} MB)")
    return manifest


_ALLOWED = {"__key__", "__url__", "__local_path__", "images.npy", "classes.json"}


def _decode(sample: dict) -> dict:
    """Only the two formats prepare writes; arrays load with allow_pickle=False."""
    extra = set(sample) - _ALLOWED
    if extra:
        raise ShardError(f"{sample.get('__url__')}: unexpected member(s) {sorted(extra)} in sample {sample.get('__key__')}")
    try:
        x = np.load(io.BytesIO(sample["images.npy"]), allow_pickle=False)
        meta = json.loads(sample["classes.json"])
    except (KeyError, ValueError) as e:
        raise ShardError(f"{sample.get('__url__')}: sample {sample.get('__key__')} cannot be decoded ({e})") from None
    if x.dtype != np.uint8 or x.ndim != 3:
        raise ShardError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has {x.dtype} {x.shape}, expected uint8 (n, 28, 28)")
    return {"key": sample["__key__"], "images": x, "meta": meta}


def decode_shard(url: str, data: bytes, expected: int) -> np.ndarray:
    """All episodes of one (checked) shard's bytes, in key order: (episodes, n, 28, 28) uint8."""
    try:
        samples = [_decode(x) for x in group_by_keys(tar_file_expander([{"url": url, "stream": io.BytesIO(data)}]))]
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"shard unreadable: {url} ({str(e).splitlines()[0][:200]})") from None
    if len(samples) != expected:
        raise ShardError(f"shard {url}: {len(samples)} episodes, manifest says {expected}")
    return np.stack([s["images"] for s in samples])


def load_shard(path: Path, expected: int) -> np.ndarray:
    """All episodes of one local shard file (no manifest check: `EpisodeSource` does that)."""
    return decode_shard(str(path), Path(path).read_bytes(), expected)


class EpisodeSource:
    """Random access to a split's episodes by global position, shard by shard (one cached).
    `EpisodeSource(root, "train")` for a shards root (folder or URL prefix), or
    `EpisodeSource(folder)` for a local split folder."""

    def __init__(self, root: str | Path, split: str | None = None, seed: int = 0, cache_dir: str = ""):
        if split is None:
            root, split = Path(root).parent, Path(root).name
        self.root, self.split = root, split
        self.dir = locate(root, split)
        self.manifest = read_manifest(root, split)
        self.reader = ShardReader(root, cache_dir)
        self.reader.check_sizes(split, self.manifest)
        self.seed = seed
        self.shards = self.manifest["shards"]
        self.counts = np.array([s["episodes"] for s in self.shards])
        self.size = int(self.counts.sum())
        self.ways, self.shots, self.queries = (self.manifest[k] for k in ("ways", "shots", "queries"))
        self._cache: tuple[int, np.ndarray] | None = None

    def shard(self, j: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != j:
            entry = self.shards[j]
            data = self.reader.read(self.split, entry)
            self._cache = (j, decode_shard(self.reader.url(self.split, entry["name"]), data, entry["episodes"]))
        return self._cache[1]

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
        out = []
        for p in positions:
            j, i = self.locate(p)
            out.append(self.shard(j)[i])
        return np.stack(out)

    def all(self, limit: int = 0) -> np.ndarray:
        """The split's episodes in index order (fixed val/test sets): (episodes, n, 28, 28)."""
        n = self.size if not limit else min(limit, self.size)
        out, done = [], 0
        for j in range(len(self.shards)):
            if done >= n:
                break
            x = self.shard(j)
            out.append(x[: n - done])
            done += len(out[-1])
        return np.concatenate(out)


def to_batch(x, ways: int, shots: int, queries: int) -> dict[str, torch.Tensor]:
    """uint8 episodes (tasks, ways*(shots+queries), 28, 28), numpy or a tensor on any device ->
    float tensors split into support/query, on the same device."""
    x = to_float(torch.from_numpy(x) if isinstance(x, np.ndarray) else x)   # (tasks, ways*(shots+queries), 1, 28, 28)
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
    """The same meta-batches as MetaBatches, from the whole split held as one uint8 tensor on
    `device` (each shard read and checked once): a step is an index gather, and the conversion to
    float and the task augmentation run on the device. 20,000 5-way 1-shot episodes take 157 MB."""

    def __init__(self, source: EpisodeSource, seed: int, meta_batch_size: int, rank: int, world_size: int,
                 start: int, stop: int, task_aug: float = 0.0, device: torch.device | str = "cpu"):
        super().__init__(source, seed, meta_batch_size, rank, world_size, start, stop, task_aug)
        self.offsets = np.concatenate([[0], np.cumsum(source.counts)])
        self.data = torch.cat([torch.from_numpy(source.shard(j)) for j in range(len(source.shards))]).to(device)

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        tasks = range(self.first, self.first + self.share)
        where = [self.source.locate(step * self.batch + t) for t in tasks]
        idx = torch.tensor([int(self.offsets[j]) + i for j, i in where]).to(self.data.device, non_blocking=True)
        return self._finish(self.data[idx], step, tasks)


def meta_batches(split_dir, seed: int, meta_batch_size: int, rank: int, world_size: int, start: int, stop: int,
                 task_aug: float = 0.0, num_workers: int = 0, cache_dir: str = "", device=None):
    """Iterator over this rank's share of steps start..stop-1 (see MetaBatches). `split_dir`: an
    EpisodeSource, or a local split folder."""
    if not isinstance(split_dir, EpisodeSource):
        split_dir = EpisodeSource(split_dir, None, seed, cache_dir)
    if device is not None:        # the whole split resident on `device` (no workers needed)
        return iter(ResidentBatches(split_dir, seed, meta_batch_size, rank, world_size, start, stop, task_aug, device))
    ds = MetaBatches(split_dir, seed, meta_batch_size, rank, world_size, start, stop, task_aug)
    if num_workers == 0:
        return iter(ds)
    return iter(DataLoader(ds, batch_size=None, num_workers=num_workers, prefetch_factor=4,
                           multiprocessing_context="fork" if os.name == "posix" else None))
