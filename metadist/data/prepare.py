"""Shards for a config: `prepare(cfg)` (the `metadist prepare` command) turns raw Omniglot into
train/val/test episode shards, re-hashing what is there and rebuilding what is damaged;
`ensure(cfg)` (what train does) only reads manifests: a split whose manifest matches the
requested spec is used as it is, a missing split is prepared from raw data, and a split that
differs is never rewritten (another run may be reading it): train stops and says what differs.
A node that has only the shards (a folder, or a URL prefix) trains without raw data.

The episodes depend on `data.seed` (and the data.* keys), never on the run's `seed`: runs with
seeds 0..4 share one shard set and are tested on the same test episodes. Only one `prepare`
writes a shards folder at a time (a lock file beside the splits); another waits for it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path

from metadist.config import Config
from metadist.data import omniglot
from metadist.data.shards import FORMAT, ShardError, is_remote, locate, read_manifest, split_spec, write_split

SPLITS = ("train", "val", "test")


def _counts(cfg: Config) -> dict[str, int]:
    d = cfg.data
    return {"train": d.train_episodes, "val": d.val_episodes, "test": d.test_episodes}


def requested(cfg: Config, split: str) -> dict:
    """What a split's manifest must say to be usable for `cfg` (the keys that decide its episodes).
    The manifest's `seed` is the data seed (`data.seed`; before it existed, the run's seed did
    this job, so older manifests read the same way)."""
    d = cfg.data
    return {"format": FORMAT, "split": split, "protocol": d.protocol, "ways": d.ways, "shots": d.shots,
            "queries": d.queries, "episodes": _counts(cfg)[split], "episodes_per_shard": d.episodes_per_shard,
            "seed": d.seed, "val_fraction": d.val_fraction if d.protocol == "alphabets" else None}


def digest(cfg: Config) -> str:
    """8 hex digits naming the whole shard set (every split's requested spec)."""
    spec = json.dumps([requested(cfg, s) for s in SPLITS], sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


def shards_dir(cfg: Config) -> str | Path:
    """The shards root: data.shards (a local folder, or a URL prefix), else a folder named by
    what it holds, so configs that differ in their data never share (or rewrite) one folder."""
    d = cfg.data
    if d.shards and is_remote(d.shards):
        return d.shards
    return Path(d.shards or f"data/shards/{d.protocol}-{d.ways}w{d.shots}s{d.queries}q-{digest(cfg)}")


_NAMES = {"seed": "data.seed", "protocol": "data.protocol", "ways": "data.ways", "shots": "data.shots",
          "queries": "data.queries", "episodes_per_shard": "data.episodes_per_shard", "val_fraction": "data.val_fraction"}


def _differences(cfg: Config, split: str, m: dict) -> list[str]:
    want = requested(cfg, split)
    out = []
    for k, v in want.items():
        if m.get(k) != v:
            key = _NAMES.get(k, f"data.{split}_episodes" if k == "episodes" else k)
            out.append(f"{key}={m.get(k)!r} there, {v!r} asked")
    return out


def mismatch(cfg: Config, split: str, root=None) -> str | None:
    """None when `root/split` holds a usable split for cfg; else why not."""
    root = shards_dir(cfg) if root is None else root
    try:
        m = read_manifest(root, split)
    except ShardError as e:
        return str(e)
    diff = _differences(cfg, split, m)
    return f"{locate(root, split)}: its manifest differs: {', '.join(diff)}" if diff else None


class SplitDiffers(ShardError):
    """A shards folder holds another split than the one asked for; it is left as it is."""


def _how_to_separate(cfg: Config) -> str:
    return ("point data.shards at another folder (`metadist prepare` writes it; leaving data.shards unset "
            "picks a folder named after the data settings) or set the data.* keys to the folder's values")


def ensure(cfg: Config, log=print) -> str | Path:
    """The shards root for cfg. Splits whose manifest matches are used as they are; missing splits
    are prepared from raw data (main process, under the folder's lock); a split that differs stops
    the run: it is never rewritten here."""
    root = shards_dir(cfg)
    missing, differ = {}, {}
    for s in SPLITS:
        try:
            m = read_manifest(root, s)
        except ShardError as e:
            missing[s] = str(e)
            continue
        if diff := _differences(cfg, s, m):
            differ[s] = diff
    if differ:
        split, diff = next(iter(differ.items()))
        raise SplitDiffers(f"{locate(root, split)} holds another {split} split ({', '.join(diff)}); "
                           f"train never rewrites shards another run may read: {_how_to_separate(cfg)}")
    if not missing:
        return root
    split, why = next(iter(missing.items()))
    how = ("run `metadist prepare` with the same data.* settings where the raw Omniglot is, "
           "and point data.shards at its output")
    if is_remote(root):
        raise ShardError(f"no usable {split} split at {locate(root, split)} ({why}); {how} (published at {root})")
    try:
        omniglot.locate(cfg.data.raw, log=log)
    except omniglot.DataError as e:
        raise omniglot.DataError(f"no usable {split} split in {root} ({why}); {how}. {e}") from None
    log(f"{root}: preparing {', '.join(missing)} ({why})")
    return prepare(cfg, log=log, splits=tuple(missing))


@contextlib.contextmanager
def folder_lock(root: Path, log=print):
    """One writer per shards folder: an exclusive flock on <root>/.prepare.lock, released by the
    kernel however the holder ends. A second prepare says who holds it and waits."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            log(f"{root}: {f.read().strip() or 'another process'} is preparing it; waiting")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid={os.getpid()} host={socket.gethostname()}\n")
        f.flush()
        yield


def prepare(cfg: Config, log=print, splits=SPLITS, overwrite: bool = False) -> Path:
    """Write the splits of cfg under its shards folder. A split already there with the same spec is
    checked (every shard's sha256) and kept, or rebuilt if damaged; one with another spec is
    replaced only with `overwrite` (else SplitDiffers)."""
    d = cfg.data
    out = shards_dir(cfg)
    if is_remote(out):
        raise ShardError(f"data.shards={out}: prepare writes a local folder; prepare there and publish it at that URL")
    with folder_lock(out, log):
        for s in splits:
            try:
                m = read_manifest(out, s)
            except ShardError:
                continue
            if (diff := _differences(cfg, s, m)) and not overwrite:
                raise SplitDiffers(f"{out / s} holds another {s} split ({', '.join(diff)}); runs may be reading it, "
                                   f"so prepare leaves it: {_how_to_separate(cfg)}, or pass --overwrite if none does")
        raw = omniglot.locate(d.raw, log=log)
        log(f"reading Omniglot from {raw}")
        bg, ev = (omniglot.load(raw, s) for s in omniglot.SETS)
        log(f"{bg.name}: {len({a for a, _ in bg.names})} alphabets, {len(bg.names)} characters; "
            f"{ev.name}: {len({a for a, _ in ev.names})} alphabets, {len(ev.names)} characters; {omniglot.DRAWINGS} drawings each")
        names, images = omniglot.pool(bg, ev)
        parts = omniglot.make_splits(names, d.protocol, d.seed, d.val_fraction)
        source = {cs.name: {"alphabets": len({a for a, _ in cs.names}), "characters": len(cs.names),
                            "images": len(cs.names) * omniglot.DRAWINGS, "sha256": cs.sha256} for cs in (bg, ev)}
        for name in splits:
            spec = dict(split_spec(parts[name], names, d.protocol, d.ways, d.shots, d.queries, _counts(cfg)[name],
                                   d.episodes_per_shard, d.seed, source), **requested(cfg, name))
            write_split(out, parts[name], images, names, spec, log=log)
    return out
