"""Start-up of `metadist train` on prepared shards (part of `make bench`): seconds from launching
the command to the end of its first meta-step, for a fresh run and for a relaunch that resumes,
with strong.yaml. Shards are prepared first if needed (not timed); raw Omniglot is then hidden
from the timed runs (no OMNIGLOT_DIR, another working folder), as on a node that has only shards.

  python bench/startup.py [--config configs/strong.yaml] [--repeats 3]
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


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "strong.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
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
