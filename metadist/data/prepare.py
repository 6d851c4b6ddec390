"""`metadist prepare`: raw Omniglot -> train/val/test episode shards for the configured protocol.

Usage: `prepare(cfg)` returns the shards folder; a split whose manifest matches is verified and
skipped, so calling it before every run is cheap.
"""
from __future__ import annotations

from pathlib import Path

from metadist.config import Config
from metadist.data import omniglot
from metadist.data.shards import split_spec, write_split


def shards_dir(cfg: Config) -> Path:
    d = cfg.data
    return Path(d.shards or f"data/shards/{d.protocol}-{d.ways}w{d.shots}s{d.queries}q")


def prepare(cfg: Config, log=print, splits=("train", "val", "test")) -> Path:
    d = cfg.data
    raw = omniglot.locate(d.raw, log=log)
    log(f"reading Omniglot from {raw}")
    bg, ev = (omniglot.load(raw, s) for s in omniglot.SETS)
    log(f"{bg.name}: {len({a for a, _ in bg.names})} alphabets, {len(bg.names)} characters; "
        f"{ev.name}: {len({a for a, _ in ev.names})} alphabets, {len(ev.names)} characters; {omniglot.DRAWINGS} drawings each")
    names, images = omniglot.pool(bg, ev)
    parts = omniglot.make_splits(names, d.protocol, cfg.seed, d.val_fraction)
    out = shards_dir(cfg)
    counts = {"train": d.train_episodes, "val": d.val_episodes, "test": d.test_episodes}
    source = {cs.name: {"alphabets": len({a for a, _ in cs.names}), "characters": len(cs.names),
                        "images": len(cs.names) * omniglot.DRAWINGS, "sha256": cs.sha256} for cs in (bg, ev)}
    for name in splits:
        spec = split_spec(parts[name], names, d.protocol, d.ways, d.shots, d.queries, counts[name],
                          d.episodes_per_shard, cfg.seed, source)
        write_split(out, parts[name], images, names, spec, log=log)
    return out
