"""Where shard bytes come from, checked: a local folder, or a URL prefix opened by WebDataset's own
URL openers (`http://`, `https://`, `pipe:COMMAND`; a `{}` in the prefix is replaced by the path
below it, e.g. `pipe:aws s3 cp s3://bucket/shards/{} -`). Every byte is compared with the
manifest's size and sha256 before training uses it.

One copy per node (`Store(root, access)`):
- `read(split, entry)`: a file's bytes, checked as they arrive (episode records; `metadist verify`).
- `local_path(split, entry)`: a local file to map in place. A local shard is checked once per node
  and file: a stamp (size, mtime, ctime, inode, device, sha256) in `<cache>/stamps` lets later
  starts skip the hashing, and a file changed since its stamp is checked again. A URL shard is
  fetched once per node into `data.cache_dir`: the first rank, under a lock, downloads it to a
  temporary name while hashing it, and renames it when complete and equal; the others wait and
  get the same file, so a half-written file is never mapped.
- `MappedFile`: a read-only memory map of such a file, under a read lease where the file system
  grants one: a process that opens the file for writing or truncates it is held back (up to the
  kernel's lease-break time, 45 s by default) while this one notices (`mapped_fault()`) and stops
  at the end of its step, instead of dying of SIGBUS on a page that is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import signal
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from metadist import locks
from metadist.errors import MetadistError


class ShardError(MetadistError):
    """A shard is missing, truncated, corrupt, or holds something prepare never writes."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
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


# ---- one process of a node at a time ----


@contextlib.contextmanager
def shard_lock(path: Path, what: str, timeout_s: float, say):
    """One process of the node does `what` at a time (metadist.locks); another waits, saying who
    holds it, for up to `timeout_s`, then stops with one line naming the holder. Yields who held
    the lock last (its pid and host), to name what a process that died left behind."""
    try:
        held = locks.take(path, what, timeout_s, say)
    except TimeoutError as e:
        raise ShardError(
            f"{what}: {e.args[0]} has held {path} for over {timeout_s:g} s "
            "(data.lock_timeout_s); if it is hung, stop it, then launch again"
        ) from None
    try:
        yield held.last
    finally:
        held.release()


def drop_cached_pages(root: Path) -> bool:
    """Ask the kernel to drop the cached pages of every shard under `root` (a cold node, for
    benchmarks); False where it could not (posix_fadvise missing, or a file not readable)."""
    ok = True
    for path in Path(root).rglob("*.tar"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            ok = False
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            ok = False
        finally:
            os.close(fd)
    return ok


# ---- checked once per node and file ----

_STAT = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


def file_stat(path: Path) -> dict:
    st = os.stat(path)
    return {k: getattr(st, k) for k in _STAT}


class Stamps:
    """The files of this node found equal to their manifest entry, and as what (size, times,
    inode, device): a file still the same is not hashed again; one changed since is. A stamp
    that cannot be read is one line and the file is checked again; one that cannot be written is
    one line and later starts check again."""

    def __init__(self, folder: Path, say):
        self.folder, self.say, self.unwritable = Path(folder), say, False

    def key(self, path: Path) -> str:
        return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]

    def valid(self, path: Path, entry: dict, quiet: bool = False) -> bool:
        stamp = self.folder / f"{self.key(path)}.json"
        if not stamp.exists():
            return False
        try:
            rec = json.loads(stamp.read_text())
            ok = rec["sha256"] == entry["sha256"] and rec["stat"] == file_stat(path)
            return ok and rec["path"] == str(Path(path).resolve())
        except (OSError, ValueError, KeyError, TypeError) as e:
            if not quiet:
                why = f"{type(e).__name__}: {e}"
                self.say(f"stamp {stamp} unreadable ({why}); checking {path} again")
            return False

    def write(self, path: Path, entry: dict, stat: dict) -> None:
        rec = {"path": str(Path(path).resolve()), "sha256": entry["sha256"], "stat": stat}
        stamp = self.folder / f"{self.key(path)}.json"
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(rec) + "\n")
            os.replace(tmp, stamp)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self.unwritable:
                self.say(
                    f"cannot record checked files in {self.folder} ({e.strerror or e}); this "
                    "run goes on, later starts check them again (free space there, or set "
                    "data.cache_dir to a writable folder)"
                )
            self.unwritable = True

    def check(self, path: Path, entry: dict, timeout_s: float) -> int:
        """Compare the local file `path` with its manifest entry unless its stamp says this very
        file was found equal; the ranks of a node do it once (the first under a lock, the others
        then read the stamp). Returns the bytes hashed now (0: it was stamped)."""
        if self.valid(path, entry):
            return 0
        lock = shard_lock(
            self.folder / f"{self.key(path)}.lock", f"checking {path}", timeout_s, self.say
        )
        try:
            lock.__enter__()
        except OSError:  # no lock where the stamps cannot go either: this process checks alone
            return self._hash(path, entry)
        try:
            return 0 if self.valid(path, entry, quiet=True) else self._hash(path, entry)
        finally:
            lock.__exit__(None, None, None)

    def _hash(self, path: Path, entry: dict) -> int:
        stat = file_stat(path)
        if stat["st_size"] != entry["bytes"]:
            raise ShardError(
                f"shard truncated or altered: {path} has {stat['st_size']} bytes, "
                f"manifest says {entry['bytes']}"
            )
        if sha256_file(path) != entry["sha256"]:
            raise ShardError(f"shard fails its checksum: {path}")
        if file_stat(path) != stat:
            raise ShardError(f"{path} changed while it was being checked; launch again")
        self.write(path, entry, stat)
        return entry["bytes"]


def cache_name(url: str) -> str:
    return urllib.parse.quote(url, safe="")[-200:]


def _download(url: str, part: Path, entry: dict) -> None:
    """The bytes at `url` into `part`, hashed as they stream; a ShardError names what failed: the
    URL (unreachable, truncated, altered) or the cache folder (a full disk)."""
    try:
        stream = wds.gopen(url)
    except Exception as e:
        raise ShardError(f"cannot read {url} ({why(e)})") from None
    try:
        h, n = _copy(url, stream, part, entry)
        stream, closing = None, stream
        closing.close()  # a pipe (curl) reports its failure here: an HTTP 404, a reset
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"cannot read {url} ({why(e)})") from None
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
    if n != entry["bytes"]:
        raise ShardError(
            f"shard truncated or altered: {url} has {n} bytes, manifest says {entry['bytes']}"
        )
    if h.hexdigest() != entry["sha256"]:
        raise ShardError(f"shard fails its checksum: {url}")


def _copy(url: str, stream, part: Path, entry: dict):
    """stream -> part, hashing; (hash, bytes). A write that fails names the cache folder."""
    h, n = hashlib.sha256(), 0
    with open(part, "wb") as f:
        while block := stream.read(1 << 20):
            h.update(block)
            n += len(block)
            try:
                f.write(block)
            except OSError as e:
                free = shutil.disk_usage(part.parent).free
                raise ShardError(
                    f"data.cache_dir={part.parent}: cannot write {url}'s copy ({e.strerror or e}; "
                    f"the shard is {entry['bytes'] / 1e6:.1f} MB, {free / 1e6:.1f} MB free there): "
                    "free space or point data.cache_dir at a larger disk"
                ) from None
    return h, n


def fetch_once(url: str, entry: dict, folder: Path, stamps: Stamps, timeout_s: float) -> Path:
    """This node's copy of the shard at `url`, in `folder`: the first rank downloads it under a
    lock to a temporary name, hashing it as it streams, and renames it when complete and equal to
    its manifest entry; the others wait and get the same file. A copy already there is checked
    once (its stamp); a damaged one is fetched again."""
    name = cache_name(url)
    final = folder / name
    say = stamps.say
    with shard_lock(folder / f".{name}.lock", f"fetching {url}", timeout_s, say) as last:
        if final.exists():
            try:
                stamps.check(final, entry, timeout_s)
                return final
            except ShardError as e:
                say(f"{final}: {e}; fetching it again")
                final.unlink()
        part = folder / f".{name}.part"
        if part.exists():
            say(f"removing {part}, a partial download left by {last}, which is gone")
            part.unlink()
        try:
            _download(url, part, entry)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, final)
        stamps.write(final, entry, file_stat(final))
    return final


# ---- reading in place ----

_MAPPED: list[MappedFile] = []
_SIGIO = {"set": False, "seen": False}


def _on_sigio(signum, frame) -> None:
    """A lease is being broken: mapped_fault() finds which (SIGIO's default action, to terminate
    the process, must not happen)."""
    _SIGIO["seen"] = True


class MappedFile:
    """A read-only memory map of a checked file (`.buffer`), under a read lease when the file
    system grants one (the process owns the file or has CAP_LEASE; a local file system). Without
    a lease, `changed()` compares the file's size and modification time at each step."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.stat = os.fstat(self.fd)
        self.leased = False
        if threading.current_thread() is threading.main_thread():
            if not _SIGIO["set"]:
                signal.signal(signal.SIGIO, _on_sigio)
                _SIGIO["set"] = True
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
                self.leased = True
        self.buffer = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ) if self.stat.st_size else b""
        _MAPPED.append(self)

    def changed(self, leases: bool = True) -> str | None:
        """Why this file can no longer be read in place, or None (`leases`: ask the lease too)."""
        if leases and self.leased and fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            return f"{self.path} was opened for writing or truncated by another process"
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns):
            was, now = self.stat.st_size, st.st_size
            return f"{self.path} changed while it was mapped ({was} -> {now} bytes)"
        return None


def mapped_fault() -> str | None:
    """The first mapped file of this process that was changed under it, or None. Cheap enough for
    every step: a lease is asked only after a SIGIO, the others' size and time are compared."""
    for m in _MAPPED:
        if why := m.changed(leases=_SIGIO["seen"]):
            return why
    return None


@dataclass(frozen=True)
class Access:
    """How a process reaches a shards root's files. cache_dir: URL shards are fetched there once
    per node (else read into memory, process by process), and the stamps of checked files live
    there (else in the per-user cache, metadist/machine.py); pool: mmap (the pool files read in
    place, one copy per node) | memory (a private decoded copy per process); lock_timeout_s: how
    long a rank waits for another's check or download; say: notes and progress (None: silent)."""

    cache_dir: str = ""
    pool: str = "mmap"
    lock_timeout_s: float = 600.0
    say: Callable | None = None

    @classmethod
    def of(cls, d, say=None) -> Access:
        """From the data section."""
        return cls(d.cache_dir, d.pool, d.lock_timeout_s, say)


class Store:
    """The files of one shards root, local or remote, each checked against its manifest entry
    before anything decodes it (see the module's docstring)."""

    def __init__(self, root: str | Path, access: Access = Access()):
        from metadist.machine import cache_dir

        self.root, self.remote, self.access = str(root), is_remote(root), access
        self.say = access.say or (lambda *a, **k: None)
        base = Path(access.cache_dir).expanduser() if access.cache_dir else cache_dir()
        self.stamps = Stamps(base / "stamps", self.say)
        self.cache = (
            Path(access.cache_dir).expanduser() if access.cache_dir and self.remote else None
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

    def local_path(self, split: str, entry: dict) -> tuple[Path | None, int]:
        """(a checked local file of this shard, bytes hashed to check it now): the file itself,
        or this node's copy of a URL shard; (None, 0) for a URL shard with no data.cache_dir."""
        url, timeout = self.url(split, entry["name"]), self.access.lock_timeout_s
        if not self.remote:
            if not Path(url).is_file():
                raise ShardError(f"shard missing: {url}")
            return Path(url), self.stamps.check(Path(url), entry, timeout)
        if self.cache is None:
            return None, 0
        return fetch_once(url, entry, self.cache, self.stamps, timeout), 0

    def read(self, split: str, entry: dict) -> bytes:
        """All bytes of a shard, checked now (every call reads and hashes them)."""
        url = self.url(split, entry["name"])
        if not self.remote:
            try:
                return checked(url, Path(url).read_bytes(), entry)
            except FileNotFoundError:
                raise ShardError(f"shard missing: {url}") from None
        if self.cache is None:
            return checked(url, read_url(url), entry)
        path, _ = self.local_path(split, entry)
        try:
            return checked(url, path.read_bytes(), entry)
        except ShardError:  # the node's copy was damaged since it was checked: fetch it once more
            path.unlink(missing_ok=True)
            path, _ = self.local_path(split, entry)
            return checked(url, path.read_bytes(), entry)
