"""Start-up of `metadist train` on prepared shards (part of `make bench`): seconds from launching
the command to the end of its first meta-step, for a fresh run and for a relaunch that resumes,
with strong.yaml. Shards are prepared first if needed (not timed); raw Omniglot is then hidden
from the timed runs (no OMNIGLOT_DIR, another working folder), as on a node that has only shards.

With --pool-gb N: an 84x84 RGB dataset whose train pool is N GB (synthetic, format-identical,
bench/pool_memory.py), a small Conv4 so that the start-up is what is timed: a cold node (no stamp
of a checked file, the pool's pages dropped from the page cache) hashes every pool byte once and
says at what speed; a warm node (stamped files) starts without hashing.

  python bench/startup.py [--config configs/strong.yaml] [--repeats 3] [--pool-gb 4 --work DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench import machine  # noqa: E402
from metadist.data.store import drop_cached_pages  # noqa: E402

_FIRST = re.compile(r"first meta-step done ([\d.]+) s after launch")


def first_step(args: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(seconds from Popen to the first-step line, the process's own figure from its import)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "metadist", "train", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    for line in p.stdout:
        m = _FIRST.search(line)
        if m:
            wall = time.perf_counter() - t0
            p.kill()
            p.wait()
            return wall, float(m[1])
    p.wait()
    raise SystemExit(f"train exited {p.returncode} before its first meta-step: {' '.join(args)}")


_CHECKED = re.compile(r"checked ([\d.]+) MB of pool shards in ([\d.]+) s \((\d+) MB/s\)")


def pool_startup(gb: float, repeats: int, work: Path) -> None:
    """Launch to first logged step on an 84x84 dataset with a `gb` GB train pool, cold and warm."""
    from bench.pool_memory import make_pool, pool_overrides

    t = time.perf_counter()
    root = make_pool(work, gb)
    print(f"{gb:g} GB train pool at {root} ({time.perf_counter() - t:.0f} s to write, not timed)")
    args = [
        *pool_overrides(root, gb),
        "model.hidden=8",
        "train.meta_batch_size=2",
        "train.log_every=1",
        "train.val_every=1000",
        "algo.strategy=batched",
        "tracking.mode=disabled",
        "train.threads=2",
        f"run.root={work / 'runs'}",
    ]
    rows = {"cold": [], "warm": []}
    for i in range(repeats):
        cache = work / f"cache-{i}"  # no stamps: a node that has not checked these files
        env = dict(os.environ, METADIST_CACHE_DIR=str(cache))
        for state in ("cold", "warm"):
            if state == "cold":
                drop_cached_pages(root)
            wall, own, checked = first_step_checked([*args, f"run.name={state}{i}"], work, env)
            rows[state].append((wall, own, checked))
    print(f"{'node':<6} {'launch to first step (s, median)':>33} {'after import (s)':>17}  hashing")
    for k, v in rows.items():
        speeds = [c for _, _, c in v if c]
        said = f"{statistics.median(speeds):.0f} MB/s" if speeds else "none (stamped)"
        print(
            f"{k:<6} {statistics.median(w for w, _, _ in v):>33.1f} "
            f"{statistics.median(o for _, o, _ in v):>17.1f}  {said}"
        )


def first_step_checked(args: list[str], cwd: Path, env: dict) -> tuple[float, float, float]:
    """As first_step, also reading the hashing speed the run reports (0: nothing hashed)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "metadist", "train", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    speed = 0.0
    for line in p.stdout:
        if m := _CHECKED.search(line):
            speed = float(m[3])
        if m := _FIRST.search(line):
            wall = time.perf_counter() - t0
            p.kill()
            p.wait()
            return wall, float(m[1]), speed
    p.wait()
    raise SystemExit(f"train exited {p.returncode} before its first meta-step: {' '.join(args)}")


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "strong.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pool-gb", type=float, default=0.0)
    ap.add_argument("--work", default="")
    a = ap.parse_args()
    if a.pool_gb:
        print(f"machine: {machine(torch.device('cpu'))}; {time.strftime('%Y-%m-%d')}")
        work = Path(a.work or tempfile.mkdtemp(prefix="startup-"))
        pool_startup(a.pool_gb, a.repeats, work)
        return
    shards = ROOT / "data" / "shards" / "alphabets-5w1s1q"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "metadist",
            "prepare",
            "--config",
            a.config,
            f"data.shards={shards}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    env = {k: v for k, v in os.environ.items() if k != "OMNIGLOT_DIR"}
    print(
        f"machine: {machine(torch.device('cpu'))}; {Path(a.config).name} on prepared shards, no "
        "raw data"
    )
    rows = {"fresh": [], "resume": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            base = [
                "--config",
                a.config,
                f"data.shards={shards}",
                f"run.root={tmp}",
                f"run.name=s{i}",
                "tracking.mode=disabled",
            ]
            rows["fresh"].append(first_step(base, Path(tmp), env))
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "metadist",
                    "train",
                    *base,
                    "run.fresh=true",
                    "train.steps=2",
                    "train.val_every=1000",
                    "eval.test_episodes=8",
                ],
                cwd=tmp,
                env=env,
                capture_output=True,
            )
            rows["resume"].append(first_step(base, Path(tmp), env))
    print(f"{'launch':<8} {'to first meta-step (s, median)':>31} {'of which after import (s)':>26}")
    for k, v in rows.items():
        print(
            f"{k:<8} {statistics.median(w for w, _ in v):>31.1f} "
            f"{statistics.median(s for _, s in v):>26.1f}"
        )


if __name__ == "__main__":
    main()
