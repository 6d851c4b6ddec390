"""The shards a run reads, as one component: `Sources.of(data_section)` holds their names, roots and
weights. One shards folder (data.shards) is the unnamed case of many (data.sources), not a branch:
its one name is "". The Trainer and `metadist evaluate` ask it which splits to open (checked to
mix: images of one shape, episodes of one kind), how many test episodes each gives, what the
algorithm must be able to train on, and it records the sources in the run folder (sources.json).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from metadist import log
from metadist.config import ConfigError
from metadist.data.prepare import ensure, shards_dir
from metadist.data.split import EpisodeSource
from metadist.data.store import Access, ShardError, read_manifest


def source_names(roots: list) -> list[str]:
    """A short name per source (data.sources): its folder's or URL's last part, numbered where two
    are alike."""
    names = [str(r).rstrip("/").rsplit("/", 1)[-1] or str(r) for r in roots]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def image_shape_problem(where: str, have, want) -> str | None:
    """Why images of shape `have` (C, H, W) do not fit a model of `want`, or None (the one check of
    a split's image shape against data.channels and data.image_size)."""
    if list(have) == list(want):
        return None
    return (
        f"{where}: images of shape {list(have)}, data.channels and data.image_size say "
        f"{list(want)} (prepare the shards at the model's, or set those to the shards')"
    )


def test_set_id(*roots) -> str:
    """16 hex digits naming the test episodes of these shards roots (from their shards' hashes):
    equal ids, same test."""
    shards = [s for root in roots for s in read_manifest(root, "test")["shards"]]
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]


def _kind(s: EpisodeSource) -> str:
    return "variable" if s.variable else f"{s.ways}-way {s.shots}-shot {s.queries}-query"


@dataclass(frozen=True)
class Sources:
    """The shards roots of a run, each with its name ("" for one unnamed root) and weight, and how
    their shards are read (`access`: caches, the pool's form, lock timeouts)."""

    names: tuple[str, ...]
    roots: tuple
    weights: tuple[float, ...]
    access: Access = Access()

    @classmethod
    def of(cls, d, say=None) -> Sources:
        """data.sources (each task's source drawn by data.source_weights), or data.shards; read
        as data.cache_dir, data.pool and data.lock_timeout_s say (`say`: their lines)."""
        access = Access.of(d, say)
        if d.sources:
            roots = tuple(d.sources)
            weights = tuple(d.source_weights) or (1.0,) * len(roots)
            return cls(tuple(source_names(roots)), roots, tuple(map(float, weights)), access)
        return cls(("",), (shards_dir(d),), (1.0,), access)

    @classmethod
    def one(cls, root, access: Access = Access()) -> Sources:
        """One shards folder (another run's, or a cross-domain test)."""
        return cls(("",), (root,), (1.0,), access)

    @property
    def many(self) -> bool:
        return len(self.roots) > 1 or self.names != ("",)

    @property
    def labels(self) -> list[str]:
        """The names metrics are reported under: none for one source."""
        return list(self.names) if self.many else []

    def open(self, split: str, seed: int = 0, access: Access | None = None) -> list:
        """`split` of every source (EpisodeSources, read with `access`, default the sources'),
        checked to mix in one run: images of one shape, episodes of one kind (variable, or fixed
        of one ways/shots/queries). A source that does not mix is one ShardError naming it."""
        access = access or self.access
        out = [EpisodeSource(r, split, seed, access) for r in self.roots]
        first, names = out[0], self.names
        for name, s in zip(names[1:], out[1:]):
            if s.image_shape != first.image_shape:
                raise ShardError(
                    f"data.sources: {name} has images of shape {list(s.image_shape)}, {names[0]} "
                    f"{list(first.image_shape)}: prepare every source at one data.image_size and "
                    "data.channels"
                )
            if _kind(s) != _kind(first):
                raise ShardError(
                    f"data.sources: {name} has {_kind(s)} episodes, {names[0]} {_kind(first)}: "
                    "prepare every source with the same data.episode (variable, or one "
                    "ways/shots/queries)"
                )
        return out

    def check_mix(self, algo, want: tuple) -> None:
        """Many sources, each prepared on its own, before a run starts on them: their train
        splits (read quietly) mix and suit the run (`check`)."""
        self.check(self.open("train", access=Access()), algo, want)

    def check(self, splits: list[EpisodeSource], algo, want: tuple) -> None:
        """What a run trains on suits it: the images the shape its config says (`want`: its
        weights files carry it; many sources, whose shards no run prepares), the algorithm able
        to train on variable episodes and on many sources (`algo`: its class and section)."""
        cls, a = algo
        first = splits[0]
        if self.many and (problem := image_shape_problem("data.sources", first.image_shape, want)):
            raise ConfigError(problem)
        for problem in (
            first.variable and cls.variable_problem(a),
            self.many and cls.sources_problem(a),
        ):
            if problem:
                raise ConfigError(problem)

    def settle(self, d, run_dir: Path) -> None:
        """Main process, before the ranks open anything: one source's shards prepared if missing
        (data.raw -> data.shards); many sources recorded in sources.json (a run launched again
        on sources whose shards changed is refused)."""
        if not self.many:
            ensure(d, log=log.say)
            return
        record = {}
        for name, root, w in zip(self.names, self.roots, self.weights):
            splits = {s: read_manifest(root, s) for s in ("train", "val", "test")}
            record[name] = {"root": str(root), "weight": w, "manifests": splits}
        path = run_dir / "sources.json"
        if path.is_file():
            old = json.loads(path.read_text())
            for name, r in record.items():
                if old.get(name, {}).get("manifests") != r["manifests"]:
                    raise ConfigError(
                        f"data.sources: {name} ({r['root']}) is not the shards this run started "
                        f"on ({path} records them): put them back, or start another run.name"
                    )
        else:
            path.write_text(json.dumps(record, indent=1) + "\n")
        total = sum(self.weights)
        log.say(
            f"{len(self.roots)} sources, each task's drawn by weight: "
            + ", ".join(f"{n} {w / total:.2f}" for n, w in zip(self.names, self.weights))
        )

    def episodes(self, split: str, limit: int = 0) -> dict[str, list]:
        """Each source's fixed episodes of `split` (the first `limit`; 0: all), by name."""
        return {
            n: EpisodeSource(r, split, access=self.access).all(limit)
            for n, r in zip(self.names, self.roots)
        }

    def test_limit(self, e) -> int:
        """Test episodes read from each source: eval.episodes_per_source of many, else
        eval.test_episodes."""
        return e.episodes_per_source if self.many else e.test_episodes

    def test_record(self, r: dict) -> dict:
        """summary.json's test keys of report `r`: the test set's id (and per source, each
        one's row and id)."""
        out = {
            "test_accuracy": r["accuracy"],
            "test_ci95": r["ci95"],
            "test_episodes": r["episodes"],
            "test_set": test_set_id(*self.roots),
        }
        if self.many:
            out["test_sources"] = {
                n: dict(r["sources"][n], test_set=test_set_id(root))
                for n, root in zip(self.names, self.roots)
            }
        return out
