"""Episode shards: the only webdataset import. Write a split's episodes as tar shards + manifest,
and stream them back as meta-batches that depend on (seed, step) only, never on the world size.

One sample = one episode: `images.npy` (ways*(shots+queries), 28, 28) uint8, saved without
pickle, and `classes.json`. A split folder holds `<split>-NNNNNN.tar` and `manifest.json` (with
every shard's sha256); it is written in a temporary folder and renamed when complete.
Order: epoch e visits the shards in a permutation of (seed, e) and each shard's episodes in a
permutation of (seed, e, shard); global position p = step * meta_batch + task. Rank r of W takes
tasks [r*B/W, (r+1)*B/W) of every step, so the global batch is the same for any W.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metadist import __version__
from metadist.data.episodes import episode_rng, labels, rotate_tasks, sample_episode, task_rotations
from metadist.data.omniglot import Split

FORMAT = 1


class ShardError(RuntimeError):
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


def read_manifest(split_dir: Path) -> dict:
    path = Path(split_dir) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{split_dir}: no manifest.json (run `metadist prepare` first)")
    return json.loads(path.read_text())


def verify(split_dir: Path, manifest: dict | None = None) -> None:
    """Check every shard of a split against the manifest's sizes and sha256; name the first bad one."""
    manifest = manifest or read_manifest(split_dir)
    for s in manifest["shards"]:
        _check_shard(Path(split_dir), s)


def _check_shard(split_dir: Path, s: dict) -> Path:
    path = split_dir / s["name"]
    if not path.is_file():
        raise ShardError(f"shard missing: {path}")
    size = path.stat().st_size
    if size != s["bytes"]:
        raise ShardError(f"shard truncated or altered: {path} has {size} bytes, manifest says {s['bytes']}")
    if sha256_file(path) != s["sha256"]:
        raise ShardError(f"shard fails its checksum: {path}")
    return path


def write_split(out: Path, split: Split, images: np.ndarray, names: list[tuple[str, str, str]], spec: dict,
                log=print) -> dict:
    """Write (or reuse) `out/<split>/`. Returns the manifest. Same spec + data -> same bytes."""
    final = Path(out) / split.name
    if (final / "manifest.json").is_file():
        old = read_manifest(final)
        if {k: old.get(k) for k in spec} == spec:
            try:
                verify(final, old)
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


def load_shard(path: Path, expected: int) -> np.ndarray:
    """All episodes of one (verified) shard, in key order: (episodes, n, 28, 28) uint8."""
    pipe = wds.DataPipeline(wds.SimpleShardList([str(path)]),
                            wds.tarfile_to_samples(handler=wds.reraise_exception), wds.map(_decode))
    try:
        samples = list(pipe)
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"shard unreadable: {path} ({e})") from None
    if len(samples) != expected:
        raise ShardError(f"shard {path}: {len(samples)} episodes, manifest says {expected}")
    return np.stack([s["images"] for s in samples])


class EpisodeSource:
    """Random access to a split's episodes by global position, shard by shard (one cached)."""

    def __init__(self, split_dir: str | Path, seed: int = 0):
        self.dir = Path(split_dir)
        self.manifest = read_manifest(self.dir)
        self.seed = seed
        self.shards = self.manifest["shards"]
        self.counts = np.array([s["episodes"] for s in self.shards])
        self.size = int(self.counts.sum())
        self.ways, self.shots, self.queries = (self.manifest[k] for k in ("ways", "shots", "queries"))
        self._cache: tuple[int, np.ndarray] | None = None

    def shard(self, j: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != j:
            path = _check_shard(self.dir, self.shards[j])
            self._cache = (j, load_shard(path, self.shards[j]["episodes"]))
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


def to_batch(x: np.ndarray, ways: int, shots: int, queries: int) -> dict[str, torch.Tensor]:
    """uint8 episodes (tasks, ways*(shots+queries), 28, 28) -> float tensors split into support/query."""
    x = torch.from_numpy(x).float().div_(255).unsqueeze(2)   # (tasks, ways*(shots+queries), 1, 28, 28)
    tasks, ns = x.shape[0], ways * shots
    return {"x_support": x[:, :ns], "y_support": labels(ways, shots).expand(tasks, -1),
            "x_query": x[:, ns:], "y_query": labels(ways, queries).expand(tasks, -1)}


class MetaBatches(IterableDataset):
    """Rank `rank`'s share of the global meta-batches for steps [start, stop), in step order.

    DataLoader workers take steps round-robin (worker k: start+k, start+k+n, ...), which the
    DataLoader yields back in order. Task augmentation is drawn per (seed, step, global task).
    """

    def __init__(self, split_dir, seed: int, meta_batch_size: int, rank: int, world_size: int,
                 start: int, stop: int, task_aug: float = 0.0):
        if meta_batch_size % world_size:
            raise ValueError(f"meta_batch_size {meta_batch_size} does not split over {world_size} processes")
        self.split_dir, self.seed, self.batch = split_dir, seed, meta_batch_size
        self.share = meta_batch_size // world_size
        self.first = rank * self.share
        self.start, self.stop, self.task_aug = start, stop, task_aug
        self.source = EpisodeSource(split_dir, seed)

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        tasks = range(self.first, self.first + self.share)
        x = self.source.episodes([step * self.batch + t for t in tasks])
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


def meta_batches(split_dir, seed: int, meta_batch_size: int, rank: int, world_size: int, start: int, stop: int,
                 task_aug: float = 0.0, num_workers: int = 0):
    """Iterator over this rank's share of steps start..stop-1 (see MetaBatches)."""
    ds = MetaBatches(split_dir, seed, meta_batch_size, rank, world_size, start, stop, task_aug)
    if num_workers == 0:
        return iter(ds)
    return iter(DataLoader(ds, batch_size=None, num_workers=num_workers, prefetch_factor=4,
                           multiprocessing_context="fork" if os.name == "posix" else None))
