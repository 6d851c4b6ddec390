"""Shards for a config: `prepare(cfg)` (the `metadist prepare` command) turns raw Omniglot into
train/val/test episode shards, re-hashing what is there and rebuilding what is damaged;
`ensure(cfg)` (what train does) only reads manifests: a split whose manifest matches the
requested spec is used as it is, and raw Omniglot is read only for a split that is missing or
differs. A node that has only the shards (a folder, or a URL prefix) trains without raw data.
"""
from __future__ import annotations

from pathlib import Path

from metadist.config import Config
from metadist.data import omniglot
from metadist.data.shards import FORMAT, ShardError, is_remote, locate, read_manifest, split_spec, write_split

SPLITS = ("train", "val", "test")


def shards_dir(cfg: Config) -> str | Path:
    """The shards root: a local folder (Path) or a URL prefix (str)."""
    d = cfg.data
    if d.shards and is_remote(d.shards):
        return d.shards
    return Path(d.shards or f"data/shards/{d.protocol}-{d.ways}w{d.shots}s{d.queries}q")


def _counts(cfg: Config) -> dict[str, int]:
    d = cfg.data
    return {"train": d.train_episodes, "val": d.val_episodes, "test": d.test_episodes}


def requested(cfg: Config, split: str) -> dict:
    """What a split's manifest must say to be usable for `cfg` (the keys that decide its episodes)."""
    d = cfg.data
    return {"format": FORMAT, "split": split, "protocol": d.protocol, "ways": d.ways, "shots": d.shots,
            "queries": d.queries, "episodes": _counts(cfg)[split], "episodes_per_shard": d.episodes_per_shard,
            "seed": cfg.seed, "val_fraction": d.val_fraction if d.protocol == "alphabets" else None}


def mismatch(cfg: Config, split: str, root=None) -> str | None:
    """None when `root/split` holds a usable split for cfg; else why not."""
    root = shards_dir(cfg) if root is None else root
    try:
        m = read_manifest(root, split)
    except ShardError as e:
        return str(e)
    want = requested(cfg, split)
    diff = [f"{k} {m.get(k)!r} (want {v!r})" for k, v in want.items() if m.get(k) != v]
    return f"{locate(root, split)}: its manifest differs: {', '.join(diff)}" if diff else None


def ensure(cfg: Config, log=print) -> str | Path:
    """The shards root for cfg, preparing only splits that are missing or differ (main process)."""
    root = shards_dir(cfg)
    missing = {s: why for s in SPLITS if (why := mismatch(cfg, s, root))}
    if not missing:
        return root
    split, why = next(iter(missing.items()))
    how = ("run `metadist prepare` with the same data.* settings and seed where the raw Omniglot is, "
           "and point data.shards at its output")
    if is_remote(root):
        raise ShardError(f"no usable {split} split at {locate(root, split)} ({why}); {how} (published at {root})")
    try:
        omniglot.locate(cfg.data.raw, log=log)
    except omniglot.DataError as e:
        raise omniglot.DataError(f"no usable {split} split in {root} ({why}); {how}. {e}") from None
    log(f"{root}: preparing {', '.join(missing)} ({why})")
    return prepare(cfg, log=log, splits=tuple(missing))


def prepare(cfg: Config, log=print, splits=SPLITS) -> Path:
    d = cfg.data
    out = shards_dir(cfg)
    if is_remote(out):
        raise ShardError(f"data.shards={out}: prepare writes a local folder; prepare there and publish it at that URL")
    raw = omniglot.locate(d.raw, log=log)
    log(f"reading Omniglot from {raw}")
    bg, ev = (omniglot.load(raw, s) for s in omniglot.SETS)
    log(f"{bg.name}: {len({a for a, _ in bg.names})} alphabets, {len(bg.names)} characters; "
        f"{ev.name}: {len({a for a, _ in ev.names})} alphabets, {len(ev.names)} characters; {omniglot.DRAWINGS} drawings each")
    names, images = omniglot.pool(bg, ev)
    parts = omniglot.make_splits(names, d.protocol, cfg.seed, d.val_fraction)
    source = {cs.name: {"alphabets": len({a for a, _ in cs.names}), "characters": len(cs.names),
                        "images": len(cs.names) * omniglot.DRAWINGS, "sha256": cs.sha256} for cs in (bg, ev)}
    for name in splits:
        spec = dict(split_spec(parts[name], names, d.protocol, d.ways, d.shots, d.queries, _counts(cfg)[name],
                               d.episodes_per_shard, cfg.seed, source), **requested(cfg, name))
        write_split(out, parts[name], images, names, spec, log=log)
    return out
