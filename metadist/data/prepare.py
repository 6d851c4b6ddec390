"""Shards for a data section: `prepare(d)` (the `metadist prepare` command) turns raw images
(Omniglot, or your own class folders: data.source) into train/val/test episode shards, re-hashing
what is there and rebuilding what is damaged;
`ensure(d)` (what train does) only reads manifests: a split whose manifest matches the
requested spec is used as it is, a missing split is prepared from raw data, and a split that
differs is never rewritten (another run may be reading it): train stops and says what differs.
A node that has only the shards (a folder, or a URL prefix) trains without raw data.

The episodes depend on `data.seed` (and the data.* keys), never on the run's `seed`: runs with
seeds 0..4 share one shard set and are tested on the same test episodes. Only one `prepare`
writes a shards folder at a time (a lock file beside the splits); another waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from metadist import locks
from metadist.config import DataConfig
from metadist.data.episodes import check_variable_split
from metadist.data.format import FORMAT, write_split
from metadist.data.sources import DataError, folder, omniglot
from metadist.data.store import ShardError, is_remote, locate, read_manifest

SPLITS = ("train", "val", "test")


def _counts(d: DataConfig) -> dict[str, int]:
    return {"train": d.train_episodes, "val": d.val_episodes, "test": d.test_episodes}


def dataset_name(d: DataConfig) -> str:
    """data.name, else `omniglot`, else the folder name of data.raw."""
    if d.name:
        return d.name
    if d.source == "omniglot":
        return "omniglot"
    if not d.raw:
        raise DataError(
            "data.source=folder needs data.name (a node with only the shards) or data.raw (the "
            "dataset's root)"
        )
    return Path(d.raw).expanduser().resolve().name


def image_shape(d: DataConfig) -> list[int]:
    return [d.channels, d.image_size, d.image_size]


def preprocessing(d: DataConfig) -> dict:
    """How raw images become the model's input (`predict` applies the same to a task's images)."""
    if d.source == "omniglot":
        return {"channels": 1, "size": d.image_size, "resize": "stretch", "invert": True}
    return {
        "channels": d.channels,
        "size": d.image_size,
        "resize": d.folder.resize,
        "invert": d.folder.invert,
    }


def requested(d: DataConfig, split: str) -> dict:
    """What a split's manifest must say to be usable for `d` (the keys that decide its episodes).
    The manifest's `seed` is the data seed (`data.seed`)."""
    ways, shots, queries = d.episode_shape(split)
    spec = {
        "format": FORMAT,
        "split": split,
        "dataset": dataset_name(d),
        "source": d.source,
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "episodes": _counts(d)[split],
        "episodes_per_shard": d.episodes_per_shard,
        "seed": d.seed,
        "image_shape": image_shape(d),
        "preprocessing": preprocessing(d),
    }
    if d.episode == "variable":  # a fixed split's spec (and its old manifests) keeps its keys
        spec.update(episode="variable", variable=dataclasses.asdict(d.variable))
    if d.source == "omniglot":
        spec.update(
            protocol=d.protocol, val_fraction=d.val_fraction if d.protocol == "alphabets" else None
        )
    else:
        f = d.folder
        spec.update(
            layout=f.split,
            class_depth=f.class_depth,
            small_classes=f.small_classes,
            fractions=[d.val_fraction, f.test_fraction] if f.split == "fractions" else None,
        )
    return spec


def digest(d: DataConfig) -> str:
    """8 hex digits naming the whole shard set (every split's requested spec)."""
    spec = json.dumps([requested(d, s) for s in SPLITS], sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


def shards_dir(d: DataConfig) -> str | Path:
    """The shards root: data.shards (a local folder, or a URL prefix), else a folder named by
    what it holds, so configs that differ in their data never share (or rewrite) one folder."""
    if d.shards and is_remote(d.shards):
        return d.shards
    label = f"omniglot-{d.protocol}" if d.source == "omniglot" else dataset_name(d)
    shape = "variable" if d.episode == "variable" else f"{d.ways}w{d.shots}s{d.queries}q"
    if d.episode != "variable" and d.episode_shape("train") != d.episode_shape("test"):
        ways, _, queries = d.episode_shape("train")
        shape += f"-train{ways}w{queries}q"
    return Path(d.shards or f"data/shards/{label}-{shape}-{digest(d)}")


_NAMES = {
    "seed": "data.seed",
    "protocol": "data.protocol",
    "ways": "data.ways",
    "shots": "data.shots",
    "queries": "data.queries",
    "episodes_per_shard": "data.episodes_per_shard",
    "val_fraction": "data.val_fraction",
    "dataset": "data.name",
    "source": "data.source",
    "image_shape": "data.channels/data.image_size",
    "layout": "data.folder.split",
    "class_depth": "data.folder.class_depth",
    "small_classes": "data.folder.small_classes",
    "fractions": "data.val_fraction/data.folder.test_fraction",
    "preprocessing": "data.folder.resize/data.folder.invert",
}


def _differences(d: DataConfig, split: str, m: dict) -> list[str]:
    want = requested(d, split)
    out = []
    for k, v in want.items():
        if m.get(k) != v:
            key = _NAMES.get(k, f"data.{split}_episodes" if k == "episodes" else k)
            if split == "train" and k in ("ways", "queries"):
                key = f"data.train_{k} (or {key})"
            out.append(f"{key}={m.get(k)!r} there, {v!r} asked")
    return out


def mismatch(d: DataConfig, split: str, root=None) -> str | None:
    """None when `root/split` holds a usable split for `d`; else why not."""
    root = shards_dir(d) if root is None else root
    try:
        m = read_manifest(root, split)
    except ShardError as e:
        return str(e)
    diff = _differences(d, split, m)
    return f"{locate(root, split)}: its manifest differs: {', '.join(diff)}" if diff else None


class SplitDiffers(ShardError):
    """A shards folder holds another split than the one asked for; it is left as it is."""


def _how_to_separate(d: DataConfig) -> str:
    return (
        "point data.shards at another folder (`metadist prepare` writes it; leaving data.shards "
        "unset "
        "picks a folder named after the data settings) or set the data.* keys to the folder's "
        "values"
    )


def ensure(d: DataConfig, log=print) -> str | Path:
    """The shards root for `d`. Splits whose manifest matches are used as they are; missing splits
    are prepared from raw data (main process, under the folder's lock); a split that differs stops
    the run: it is never rewritten here."""
    root = shards_dir(d)
    missing, differ = {}, {}
    for s in SPLITS:
        try:
            m = read_manifest(root, s)
        except ShardError as e:
            missing[s] = str(e)
            continue
        if diff := _differences(d, s, m):
            differ[s] = diff
    if differ:
        split, diff = next(iter(differ.items()))
        raise SplitDiffers(
            f"{locate(root, split)} holds another {split} split ({', '.join(diff)}); "
            f"train never rewrites shards another run may read: {_how_to_separate(d)}"
        )
    if not missing:
        return root
    split, why = next(iter(missing.items()))
    how = (
        "run `metadist prepare` with the same data.* settings where the raw data is, "
        "and point data.shards at its output"
    )
    if is_remote(root):
        raise ShardError(
            f"no usable {split} split at {locate(root, split)} ({why}); {how} (published at {root})"
        )
    try:
        if d.source == "omniglot":
            omniglot.locate(d.raw, log=log)
        elif not d.raw or not Path(d.raw).expanduser().is_dir():
            raise DataError(f"data.raw={d.raw!r} is not the dataset's root folder")
    except DataError as e:
        raise DataError(f"no usable {split} split in {root} ({why}); {how}. {e}") from None
    log(f"{root}: preparing {', '.join(missing)} ({why})")
    return prepare(d, log=log, splits=tuple(missing))


@contextlib.contextmanager
def folder_lock(root: Path, log=print):
    """One writer per shards folder: an exclusive flock on <root>/.prepare.lock, released by the
    kernel however the holder ends. A second prepare says who holds it and waits. A folder this
    call made is removed again if it fails before writing anything (bad input leaves nothing)."""
    made = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(root, log):
            yield
    except BaseException:
        if made and [p.name for p in root.iterdir()] == [".prepare.lock"]:
            shutil.rmtree(root, ignore_errors=True)
        raise


def _locked(root: Path, log):
    return locks.node_lock(root / ".prepare.lock", f"preparing {root}", say=log)


def prepare(d: DataConfig, log=print, splits=SPLITS, overwrite: bool = False) -> Path:
    """Write the splits of `d` under its shards folder. A split already there with the same spec is
    checked (every shard's sha256) and kept, or rebuilt if damaged; one with another spec is
    replaced only with `overwrite` (else SplitDiffers)."""
    out = shards_dir(d)
    if is_remote(out):
        raise ShardError(
            f"data.shards={out}: prepare writes a local folder; prepare there and publish it at "
            "that URL"
        )
    with folder_lock(out, log):
        for s in splits:
            try:
                m = read_manifest(out, s)
            except ShardError:
                continue
            if (diff := _differences(d, s, m)) and not overwrite:
                raise SplitDiffers(
                    f"{out / s} holds another {s} split ({', '.join(diff)}); runs may be reading "
                    "it, "
                    f"so prepare leaves it: {_how_to_separate(d)}, or pass --overwrite if none does"
                )
        classes = load_classes(d, log)
        manifests = {}
        if d.episode == "variable":  # Meta-Dataset's test-only sources (Traffic Signs, MSCOCO)
            for name in [s for s in splits if not classes.splits[s]]:
                log(f"{out / name}: no classes in this split, not written")
            splits = [s for s in splits if classes.splits[s]]
        for name in splits:
            spec = dict(requested(d, name), content_sha256=classes.digest(name))
            manifests[name] = write_split(
                out, name, classes, spec, log=log, info={"source_info": classes.source}
            )
    log(node_needs(out, manifests))
    return out


def node_needs(out: Path, manifests: dict) -> str:
    """What a training node needs for these shards: the disk they take, and the page cache that
    keeps the train pool in memory (its ranks share that one copy; less, and pages come from
    the disk as they are read)."""
    pools = {s: m.get("pool_bytes", 0) for s, m in manifests.items()}
    total = sum(m.get("bytes", 0) for m in manifests.values())
    each = ", ".join(f"{s} {b / 1e9:.2f} GB" for s, b in pools.items())
    train = pools.get("train", 0)
    return (
        f"{out}: pools {each}; {total / 1e9:.2f} GB of shards in all. A training node needs "
        f"{total / 1e9:.2f} GB of disk for them (or of data.cache_dir, for shards at a URL) and "
        f"{train / 1e9:.2f} GB of free memory to keep the train pool in the page cache, one copy "
        "for all its ranks; with less, pages are read from the disk as episodes need them"
    )


def load_classes(d: DataConfig, log=print):
    """The configured source's classes and split (metadist.data.sources.ClassSet), checked."""
    if d.source == "omniglot":
        classes = omniglot.class_set(
            d.raw, d.protocol, d.seed, d.val_fraction, d.image_size, log=log
        )
        if d.channels == 3:  # grey as RGB, to mix with colour sources (as Meta-Dataset does)
            classes.images = [np.repeat(x, 3, axis=1) for x in classes.images]
    else:
        log(
            f"reading {d.raw} (data.folder.split={d.folder.split}, class depth "
            f"{d.folder.class_depth})"
        )
        # a support and a query; else every split's shots + queries
        need = 2 if d.episode == "variable" else d.shots + max(d.queries, d.train_queries)
        classes = folder.read_classes(d, need, log=log, empty_ok=d.episode == "variable")
        log(
            ", ".join(
                f"{s}: {len(classes.splits[s])} classes, "
                f"{sum(len(classes.images[c]) for c in classes.splits[s])} images"
                for s in SPLITS
            )
        )
    classes.check()
    if d.episode == "variable":
        classes.groups = class_groups(d.variable.groups, classes)
        if not any(classes.splits[s] for s in SPLITS):
            raise DataError(f"{d.raw}: no classes in any split")
        for s in (s for s in SPLITS if classes.splits[s]):  # an empty one is not written
            sizes = [len(classes.images[c]) for c in classes.splits[s]]
            check_variable_split(sizes, d.variable, classes.split_groups(s), s)
        return classes
    for s in SPLITS:
        ways = d.episode_shape(s)[0]
        if ways > len(classes.splits[s]):
            key = "data.train_ways" if ways != d.ways else "data.ways"
            raise DataError(
                f"{s}: {ways}-way episodes need {ways} classes, the split has "
                f"{len(classes.splits[s])} "
                f"({key}, or the split's fractions)"
            )
    return classes


def class_groups(how: str, classes) -> list[str] | None:
    """data.variable.groups: each class's group ("" none; `parent`: the folder above the class, as
    Omniglot's alphabets; else a file of `class,group` lines naming every class of the splits)."""
    if not how:
        return None
    if how == "parent":
        return [n.rsplit("/", 1)[0] if "/" in n else "" for n in classes.names]
    path = Path(how).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.variable.groups={how}: neither `parent` nor a file of class,group lines"
        )
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            name, sep, group = line.rpartition(",")
            if not sep or not name.strip():
                raise DataError(f"{path}:{n}: expected `class,group`, got {line!r}")
            table[name.strip()] = group.strip()
    missing = [c for s in SPLITS for c in classes.splits[s] if classes.names[c] not in table]
    if missing:
        raise DataError(
            f"{path}: no group for class {classes.names[missing[0]]!r} "
            f"({len(missing)} class(es) without one)"
        )
    return [table.get(n, "") for n in classes.names]
