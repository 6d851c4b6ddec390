"""Where shard bytes come from: a local folder, or a URL prefix opened by WebDataset's own URL
openers (`http://`, `https://`, `pipe:COMMAND`; a `{}` in the prefix is replaced by the path below
it, e.g. `pipe:aws s3 cp s3://bucket/shards/{} -`), optionally through a cache folder
(`data.cache_dir`). Every file is checked against its manifest entry (size, sha256) before anything
decodes it: altered bytes never reach training.

`Store(root, cache_dir)` is one shards root; `read_manifest(root, split)` its split's manifest.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import Path

import webdataset as wds
from webdataset.cache import FileCache

from metadist.errors import MetadistError


class ShardError(MetadistError):
    """A shard is missing, truncated, corrupt, or holds something prepare never writes."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


_CURL = {
    6: "host not found",
    7: "connection refused",
    18: "transfer ended early",
    22: "HTTP error (e.g. 404 not found)",
    28: "timed out",
    35: "TLS handshake failed",
    52: "empty reply",
    56: "connection lost",
}


def why(e: Exception) -> str:
    """An opener's failure in words (curl's exit codes named)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    for code, what in _CURL.items():
        if f"exit {code} " in text + " ":
            return f"{what}, curl exit {code}"
    return text[:200]


def read_url(url: str) -> bytes:
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
        raise ShardError(f"cannot read {url} ({why(e)})") from None


def read_manifest(root: str | Path, split: str | None = None) -> dict:
    """The manifest of `root/split` (or of the split folder `root` when split is None)."""
    loc = locate(root, split, "manifest.json") if split else locate(root, "manifest.json")
    if is_remote(loc):
        data = read_url(loc)
    else:
        path = Path(loc)
        if not path.is_file():
            raise ShardError(f"{path.parent}: no manifest.json (run `metadist prepare` first)")
        data = path.read_bytes()
    try:
        return json.loads(data)
    except ValueError:
        raise ShardError(f"{loc}: not a metadist manifest (not JSON)") from None


def checked(url: str, data: bytes, entry: dict) -> bytes:
    """`data` if it has the manifest entry's size and sha256; else a ShardError naming `url`."""
    if len(data) != entry["bytes"]:
        raise ShardError(
            f"shard truncated or altered: {url} has {len(data)} bytes, manifest says "
            f"{entry['bytes']}"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardError(f"shard fails its checksum: {url}")
    return data


class Store:
    """Whole files of one shards root, local or remote, each checked against its manifest entry
    (size and sha256, computed as the bytes arrive) before anything decodes it."""

    def __init__(self, root: str | Path, cache_dir: str = ""):
        self.root, self.remote = str(root), is_remote(root)
        self.cache = (
            FileCache(
                cache_dir,
                url_to_name=lambda u: urllib.parse.quote(u, safe="")[-200:],
                validator=None,
            )
            if cache_dir and self.remote
            else None
        )

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
                raise ShardError(
                    f"shard truncated or altered: {path} has {path.stat().st_size} bytes, "
                    f"manifest says {s['bytes']}"
                )

    def read(self, split: str, entry: dict) -> bytes:
        url = self.url(split, entry["name"])
        try:
            return checked(url, self._fetch(url), entry)
        except ShardError:  # a damaged cached copy: fetch it once more
            cached = (
                Path(self.cache.cache_dir) / self.cache.url_to_name(url) if self.cache else None
            )
            if cached is None or not cached.is_file():
                raise
            cached.unlink()
            return checked(url, self._fetch(url), entry)

    def _fetch(self, url: str) -> bytes:
        if not self.remote:
            try:
                return Path(url).read_bytes()
            except FileNotFoundError:
                raise ShardError(f"shard missing: {url}") from None
        if self.cache is None:
            return read_url(url)
        try:
            return Path(self.cache.get_file(url)).read_bytes()
        except Exception as e:
            raise ShardError(f"cannot read {url} ({why(e)})") from None
