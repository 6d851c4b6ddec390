"""Facts about this machine that decide how a run computes, measured once and cached per user:
which strategy is faster (metadist/strategy.py), how long a step takes (the budget schedule,
metadist/schedule.py). The same command on the same machine then reads the same answer, hence
gives the same weights.

The cache is `$METADIST_CACHE_DIR`, else `$XDG_CACHE_HOME/metadist`, else `~/.cache/metadist`; a
record is keyed by the machine (CPU model, torch version, intra-op threads) and the shape of what
was measured. Concurrent runs take a lock: one measures, the others wait and read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch


def cache_dir() -> Path:
    if os.environ.get("METADIST_CACHE_DIR"):
        return Path(os.environ["METADIST_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metadist"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached(kind: str, shape: dict, compute, say=print) -> dict:
    """A machine fact of `kind` for this machine and `shape`: from the cache, or computed now by
    `compute() -> dict` and cached (first writer wins; others wait on the lock and read it).
    Returns the record with `key`, `cache` (its file, or None) and `cached` (read, not computed)."""
    key = dict(machine(), shape=shape)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir()
    path = folder / f"{kind}-{name}.json"
    try:
        with _locked(folder / f"{kind}.lock"):
            if path.is_file():
                rec = json.loads(path.read_text())
                if rec.get("key") == key:
                    return dict(rec, cache=str(path), cached=True)
            rec = dict(compute(), key=key, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(rec, indent=1) + "\n")
            os.replace(tmp, path)
            return dict(rec, cache=str(path), cached=False)
    except OSError as e:  # no writable cache: measure for this run only, and say so
        say(
            f"{kind}: cannot use the cache {folder} ({e}); measuring for this run only "
            "(set $METADIST_CACHE_DIR to a writable folder so runs on this machine agree)"
        )
        return dict(compute(), key=key, cache=None, cached=False)
