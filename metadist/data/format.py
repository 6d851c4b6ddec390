"""The shard format: a split's images stored once, its episodes as records, and a manifest.

Format 2 (chosen by measurement, docs/data.md): `pool-NNNNNN.tar` holds the split's images, one
sample per class (`images.npy`, (n, C, H, W) uint8); `<split>-NNNNNN.tar` holds one sample per
episode (`index.npy`, (ways*(shots+queries), 3) int32: class, image, quarter turns). Arrays are
saved without pickle. `manifest.json` holds the spec, the class names and image counts, the image
shape, and every shard's size and sha256. A split is written in a temporary folder and renamed
when complete; the same spec and data give the same bytes. An 84x84 RGB 5-way 1-shot 15-query
episode is 1.7 MB of pixels but a 1 KB record.

`write_split` writes a split, `decode_pool` / `decode_records` read checked shard bytes back,
`verify` reads a whole split.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from metadist import __version__
from metadist.data.episodes import (
    VARIABLE_COLUMNS,
    check_variable_split,
    episode_rng,
    sample_episode,
    sample_variable_episode,
)
from metadist.data.sources import ClassSet
from metadist.data.store import Access, ShardError, Store, locate, read_manifest, sha256_file

FORMAT = 2
POOL_SHARD_BYTES = 256 * 2**20  # a pool shard holds whole classes, up to about this many bytes


def check_format(manifest: dict, where: str) -> None:
    if manifest.get("format") != FORMAT:
        raise ShardError(
            f"{where}: shards of format {manifest.get('format')!r} "
            f"(metadist {manifest.get('metadist_version', '?')}); this metadist reads format "
            f"{FORMAT}: "
            "prepare the split again into a new folder (`metadist prepare` with data.shards unset "
            "picks one)"
        )


def verify(
    root: str | Path, split: str | None = None, manifest: dict | None = None, cache_dir: str = ""
) -> dict:
    """Read every shard of a split (pool and episodes) and check it against the manifest; name
    the first bad one."""
    if split is None:
        root, split = Path(root).parent, Path(root).name
    manifest = manifest or read_manifest(root, split)
    check_format(manifest, locate(root, split))
    store = Store(root, Access(cache_dir))
    store.check_sizes(split, manifest)
    for s in manifest.get("pool", []) + manifest["shards"]:
        store.read(split, s)
    return manifest


# ---- writing ----


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


_TAR = {"encoder": False, "mtime": 0.0, "user": "metadist", "group": "metadist", "mode": 0o444}


def _shard_entries(folder: Path, pattern: str, counts: list[int], key: str) -> list[dict]:
    return [
        {"name": p.name, key: c, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p, c in zip(sorted(folder.glob(pattern)), counts)
    ]


def _pool_groups(classes: ClassSet, ids: list[int]) -> list[list[int]]:
    """Whole classes per pool shard (positions in `ids`), a new shard when the next class would
    pass POOL_SHARD_BYTES."""
    groups, size = [[]], 0
    for k, c in enumerate(ids):
        nbytes = classes.images[c].nbytes
        if groups[-1] and size + nbytes > POOL_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    return groups


def _write_pool(tmp: Path, classes: ClassSet, ids: list[int]) -> list[dict]:
    groups = _pool_groups(classes, ids)
    for j, group in enumerate(groups):
        with wds.TarWriter(str(tmp / f"pool-{j:06d}.tar"), **_TAR) as sink:
            for k in group:
                sink.write(
                    {"__key__": f"{k:06d}", "images.npy": _npy_bytes(classes.images[ids[k]])}
                )
    return _shard_entries(tmp, "pool-*.tar", [len(g) for g in groups], "classes")


def _sampler(split: str, sizes: list[int], rotations, spec: dict, groups: list[int] | None):
    """episode index -> its record, by the spec's kind of episode (fixed or variable)."""
    if spec.get("episode") == "variable":
        v = SimpleNamespace(**spec["variable"])
        check_variable_split(sizes, v, groups, split)
        return lambda i: sample_variable_episode(
            sizes, rotations, v, episode_rng(spec["seed"], split, i), groups
        )
    ways, shots, queries = spec["ways"], spec["shots"], spec["queries"]
    return lambda i: sample_episode(
        sizes, rotations, ways, shots, queries, episode_rng(spec["seed"], split, i), split
    )


def _write_records(tmp: Path, split: str, sample, spec: dict) -> list[dict]:
    per = spec["episodes_per_shard"]
    with wds.ShardWriter(
        str(tmp / f"{split}-%06d.tar"), maxcount=per, maxsize=1e12, verbose=0, **_TAR
    ) as sink:
        for i in range(spec["episodes"]):
            sink.write({"__key__": f"{i:08d}", "index.npy": _npy_bytes(sample(i))})
    counts = [min(per, spec["episodes"] - j * per) for j in range(-(-spec["episodes"] // per))]
    return _shard_entries(tmp, f"{split}-*.tar", counts, "episodes")


def _reusable(final: Path, out: Path, split: str, spec: dict, log) -> dict | None:
    """The manifest of `final` if it holds this spec and every shard is intact."""
    if not (final / "manifest.json").is_file():
        return None
    old = read_manifest(final)
    if {k: old.get(k) for k in spec} != spec:
        log(f"{final}: manifest differs from the requested split; rebuilding")
        return None
    try:
        verify(out, split, old)
    except ShardError as e:
        log(f"{final}: {e}; rebuilding")
        return None
    log(f"{final}: up to date ({old['episodes']} episodes, {len(old['shards'])} shards), skipped")
    return old


def write_split(
    out: Path, split: str, classes: ClassSet, spec: dict, log=print, info: dict | None = None
) -> dict:
    """Write (or reuse: same `spec`, every shard intact) `out/<split>/`: the split's classes as
    pool shards, its episodes as records; `info` goes into the manifest as well, without deciding
    reuse. Returns the manifest. Same spec + data -> same bytes."""
    final = Path(out) / split
    if (old := _reusable(final, Path(out), split, spec, log)) is not None:
        return old
    ids = classes.splits[split]
    sizes = [len(classes.images[c]) for c in ids]
    shape = list(classes.images[ids[0]].shape[1:])
    if spec.get("image_shape", shape) != shape:
        raise ValueError(
            f"{split}: images are {shape} after preprocessing, the spec says {spec['image_shape']}"
        )
    groups = classes.split_groups(split)
    sample = _sampler(split, sizes, classes.rotations[split], spec, groups)
    tmp = Path(out) / f".{split}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pool = _write_pool(tmp, classes, ids)
    shards = _write_records(tmp, split, sample, spec)
    ways, shots, queries = spec["ways"], spec["shots"], spec["queries"]
    variable = spec.get("episode") == "variable"
    if variable:
        info = dict(info or {}, class_groups=groups, record_columns=VARIABLE_COLUMNS)
    manifest = dict(
        spec,
        **(info or {}),
        image_shape=shape,
        classes=[classes.names[c] for c in ids],
        class_images=sizes,
        rotations_deg=[k * 90 for k in classes.rotations[split]],
        pool=pool,
        shards=shards,
        images_per_episode=None if variable else ways * (shots + queries),
        pool_bytes=sum(s["bytes"] for s in pool),
        bytes=sum(s["bytes"] for s in shards + pool),
        metadist_version=__version__,
    )
    _publish(tmp, final, manifest, log)
    return manifest


def _publish(tmp: Path, final: Path, manifest: dict, log) -> None:
    """The manifest written last, then the folder renamed into place: a split is whole or
    absent."""
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    shards = manifest["shards"]
    log(
        f"{final}: wrote {len(manifest['classes'])} classes ({sum(manifest['class_images'])} "
        f"images, {manifest['pool_bytes'] / 1e6:.1f} MB) and "
        f"{manifest['episodes']} episodes in {len(shards)} shards "
        f"({sum(s['bytes'] for s in shards) / 1e6:.1f} MB)"
    )


# ---- reading checked bytes ----


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
            raise ShardError(
                f"{url}: unexpected member(s) {sorted(extra)} in sample {sample.get('__key__')}"
            )
        try:
            out.append((sample["__key__"], np.load(io.BytesIO(sample[member]), allow_pickle=False)))
        except (KeyError, ValueError) as e:
            raise ShardError(
                f"{url}: sample {sample.get('__key__')} cannot be decoded ({e})"
            ) from None
    return out


def decode_records(
    url: str, data: bytes, expected: int, n: int, class_images: list[int]
) -> np.ndarray:
    """The episode records of one episode shard: (episodes, n, 3) int32, each checked to point
    inside the pool (a record that does not is a damaged or foreign shard)."""
    samples = _samples(url, data, "index.npy")
    if len(samples) != expected:
        raise ShardError(f"shard {url}: {len(samples)} episodes, manifest says {expected}")
    recs = np.stack([a for _, a in samples]) if samples else np.zeros((0, n, 3), np.int32)
    if recs.dtype != np.int32 or recs.shape[1:] != (n, 3):
        raise ShardError(
            f"{url}: episode records are {recs.dtype} {recs.shape[1:]}, expected int32 ({n}, 3)"
        )
    sizes = np.asarray(class_images)
    c, m, k = recs[..., 0], recs[..., 1], recs[..., 2]
    outside = (c < 0) | (c >= len(sizes)) | (m < 0) | (k < 0) | (k > 3)
    if outside.any() or (m >= sizes[np.clip(c, 0, len(sizes) - 1)]).any():
        raise ShardError(
            f"{url}: an episode record points outside the split's {len(sizes)} classes"
        )
    return recs


def decode_variable_records(url: str, data: bytes, expected: int, class_images: list[int]) -> list:
    """The records of one shard of variable episodes: a list of (n_i, 5) int32 arrays, each
    checked: inside the pool; labels 0..ways-1 in order, every class with support and the same
    number of queries; the support rows before the query rows (a record that is not is a damaged
    or foreign shard)."""
    samples = _samples(url, data, "index.npy")
    if len(samples) != expected:
        raise ShardError(f"shard {url}: {len(samples)} episodes, manifest says {expected}")
    sizes = np.asarray(class_images)
    out = []
    for key, r in samples:
        if r.dtype != np.int32 or r.ndim != 2 or r.shape[1] != VARIABLE_COLUMNS or not len(r):
            raise ShardError(f"{url}: episode {key} is {r.dtype} {r.shape}, expected int32 (n, 5)")
        if not _variable_record_ok(r, sizes):
            raise ShardError(f"{url}: episode {key} is not a variable episode of this split's pool")
        out.append(r)
    return out


def _variable_record_ok(r: np.ndarray, sizes: np.ndarray) -> bool:
    c, m, k, label, part = r.T
    if (c < 0).any() or (c >= len(sizes)).any() or (m < 0).any() or (k < 0).any() or (k > 3).any():
        return False
    if (m >= sizes[c]).any() or not np.isin(part, (0, 1)).all() or (np.diff(part) < 0).any():
        return False
    ways = int(label.max()) + 1
    support, query = label[part == 0], label[part == 1]
    per_query = np.bincount(query, minlength=ways)
    return bool(
        label.min() == 0
        and (np.diff(support) >= 0).all()
        and (np.diff(query) >= 0).all()
        and (np.bincount(support, minlength=ways) > 0).all()
        and (per_query == per_query[0]).all()
        and per_query[0] > 0
    )


def decode_pool(
    url: str, data: bytes, first: int, class_images: list[int], shape: tuple
) -> list[np.ndarray]:
    """The classes of one pool shard, starting at class `first`, each checked against the
    manifest."""
    out = []
    for i, (key, a) in enumerate(_samples(url, data, "images.npy")):
        k = first + i
        want = (class_images[k], *shape) if k < len(class_images) else None
        if a.dtype != np.uint8 or a.shape != want or key != f"{k:06d}":
            raise ShardError(
                f"{url}: class sample {key} is {a.dtype} {a.shape}, the manifest says uint8 {want}"
            )
        out.append(a)
    return out


def pool_members(path: Path) -> list[tuple[str, int, tuple, np.dtype, bool]]:
    """(key, offset of the array's first byte in the file, shape, dtype, fortran order) of every
    class sample of a pool shard, from its tar and .npy headers alone: no pixel is read."""
    out = []
    try:
        with tarfile.open(path, "r:") as tar, open(path, "rb") as f:
            for m in tar:
                key, _, member = m.name.partition(".")
                if member != "images.npy" or not m.isfile():
                    raise ShardError(f"{path}: unexpected member {m.name!r} in a pool shard")
                f.seek(m.offset_data)
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                start = f.tell()
                if start + int(np.prod(shape)) * dtype.itemsize != m.offset_data + m.size:
                    raise ShardError(f"{path}: class sample {key}'s array does not fill its member")
                out.append((key, start, tuple(shape), dtype, fortran))
    except (tarfile.TarError, ValueError, OSError) as e:
        raise ShardError(f"shard unreadable: {path} ({str(e).splitlines()[0][:200]})") from None
    return out


def map_pool(path: Path, buffer, first: int, class_images: list[int], shape: tuple) -> list:
    """The classes of one pool shard, starting at class `first`, as read-only arrays over
    `buffer` (the file's memory map), each checked against the manifest as decode_pool does."""
    out = []
    for i, (key, start, got, dtype, fortran) in enumerate(pool_members(path)):
        k = first + i
        want = (class_images[k], *shape) if k < len(class_images) else None
        if dtype != np.uint8 or got != want or key != f"{k:06d}" or fortran:
            raise ShardError(
                f"{path}: class sample {key} is {dtype} {got}, the manifest says uint8 {want}"
            )
        out.append(np.ndarray(got, np.uint8, buffer=buffer, offset=start))
    return out
