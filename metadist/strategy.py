"""Which strategy runs a rank's tasks (`batched`: tasks folded into one network; `loop`: one at a
time): the one owner of the rule, the measurement, its cache and its record.

- `algo.strategy=batched|loop`: used as asked.
- `auto` on CUDA: batched (the per-task loop is launch-bound there).
- `auto` on a CPU: whichever is faster depends on the CPU, and the two round float32 differently,
  so a choice made from one noisy measurement would make the same command give different weights.
  The choice is a property of the machine and the run's shape instead: measured once and kept in
  the user's cache (`$METADIST_CACHE_DIR`, else `$XDG_CACHE_HOME/metadist`, else
  `~/.cache/metadist`), keyed by CPU model, torch version, intra-op threads and the shape of a
  chunk of tasks (backbone, image, episode, algorithm); every later run on that machine with
  that shape reads the same answer. Concurrent runs take a lock: one measures, the others wait
  and read it.
- A run records what it used and why (`<run>/strategy.json`, and every checkpoint's state), and a
  resumed run keeps it, whatever the cache says by then.
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

STRATEGIES = ("batched", "loop")


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


def measure(run_chunk, rounds: int = 2) -> dict[str, float]:
    """Tasks/s of each strategy: `run_chunk(strategy) -> tasks` runs one chunk's meta-backward;
    interleaved, best of `rounds` after a warm-up round."""
    best = dict.fromkeys(STRATEGIES, 0.0)
    for r in range(rounds + 1):
        for strategy in STRATEGIES:
            t = time.perf_counter()
            tasks = run_chunk(strategy)
            if r:
                best[strategy] = max(best[strategy], tasks / (time.perf_counter() - t))
    return best


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
    except OSError as e:         # no writable cache: measure for this run only, and say so
        say(f"{kind}: cannot use the cache {folder} ({e}); measuring for this run only "
            "(set $METADIST_CACHE_DIR to a writable folder so runs on this machine agree)")
        return dict(compute(), key=key, cache=None, cached=False)


def cached_choice(shape: dict, run_chunk, say=print) -> dict:
    """The measured strategy for this machine and shape (see `cached`)."""
    def compute():
        speed = measure(run_chunk)
        return {"strategy": max(speed, key=speed.get), "tasks_per_s": speed}
    return cached("strategy", shape, compute, say)


def choose(requested: str, device: torch.device, shape: dict, run_chunk, say=print) -> dict:
    """{strategy, why, ...}: what this run uses (before any checkpoint says otherwise)."""
    if requested != "auto":
        return {"strategy": requested, "why": f"algo.strategy={requested}"}
    if device.type != "cpu":
        return {"strategy": "batched", "why": f"algo.strategy=auto on {device.type}: batched"}
    rec = cached_choice(shape, run_chunk, say)
    speeds = ", ".join(f"{k} {v:.1f}" for k, v in rec["tasks_per_s"].items())
    where = f"cached in {rec['cache']}" if rec.get("cached") else (f"measured now, cached in {rec['cache']}"
                                                                     if rec.get("cache") else "measured now")
    return dict(rec, why=f"algo.strategy=auto on this CPU: {speeds} tasks/s ({where}): {rec['strategy']}")
