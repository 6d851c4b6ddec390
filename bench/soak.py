"""`make soak`: a 2-process run killed at random moments and relaunched until it completes; its
final weights must equal an uninterrupted run's, bit for bit.

Each kill is, at random, SIGTERM to the launcher (preemption: the ranks checkpoint the current
step and exit), SIGKILL to the launcher alone (its workers get SIGTERM from the kernel and
checkpoint), or SIGKILL to every process (resume from the last periodic checkpoint). A relaunch
that finds the run folder still held by a dying worker waits and tries again.

  python bench/soak.py [--kills 10] [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_dist import accelerate_launch, free_port  # noqa: E402
from metadist.data.synthetic import write_synthetic  # noqa: E402

KINDS = ("sigterm", "sigkill-launcher", "sigkill-all")


def _launch(args: list[str]) -> subprocess.Popen:
    cmd = [
        *accelerate_launch(),
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "metadist",
        "train",
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _steps(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def soak(work: Path, kills: int = 10, steps: int = 300, seed: int = 0, log=print) -> dict:
    rng = random.Random(seed)
    raw = write_synthetic(work / "raw")
    base = [
        f"{k}={v}"
        for k, v in {
            "data.raw": raw,
            "data.shards": work / "shards",
            "data.train_episodes": 96,
            "data.val_episodes": 16,
            "data.test_episodes": 24,
            "data.episodes_per_shard": 16,
            "run.root": work / "runs",
            "tracking.mode": "disabled",
            "model.hidden": 16,
            "train.meta_batch_size": 8,
            "train.steps": steps,
            "train.log_every": 1,
            "train.val_every": 50,
            "train.checkpoint_every": 20,
            "eval.tasks_per_batch": 8,
            "eval.test_episodes": 8,
            "algo.strategy": "batched",
        }.items()
    ]
    subprocess.run(
        [sys.executable, "-m", "metadist", "prepare", *base],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    straight = _launch(base + ["run.name=straight"])
    if straight.wait() != 0:
        raise SystemExit(f"uninterrupted run failed: {straight.stderr.read()[-2000:]}")
    metrics = work / "runs" / "soak" / "metrics.jsonl"
    done, launches, history = 0, 0, []
    while True:
        proc = _launch(base + ["run.name=soak"])
        launches += 1
        if done < kills:
            at = _steps(metrics) + rng.randint(1, max(2, steps // (kills + 1)))
            while proc.poll() is None and _steps(metrics) < at:
                time.sleep(0.01)
            if proc.poll() is None:
                kind = rng.choice(KINDS)
                if kind == "sigterm":
                    os.kill(proc.pid, signal.SIGTERM)
                elif kind == "sigkill-launcher":
                    os.kill(proc.pid, signal.SIGKILL)
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
                done += 1
                history.append((kind, _steps(metrics)))
                log(f"kill {done}/{kills}: {kind} at step {history[-1][1]}")
        err = proc.communicate()[1]
        if proc.returncode == 0:
            break
        if "is in use by" in err:  # a worker of the killed launch still checkpointing
            time.sleep(0.5)
        try:  # nothing of a killed launch may live on
            os.killpg(proc.pid, 0)
            time.sleep(1.0)
        except ProcessLookupError:
            pass
        if launches > 3 * kills + 10:
            raise SystemExit(
                f"soak: no progress after {launches} launches; last error: {err[-2000:]}"
            )
    a = load_file(str(work / "runs" / "straight" / "model.safetensors"))
    b = load_file(str(work / "runs" / "soak" / "model.safetensors"))
    equal = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    return {"kills": history, "launches": launches, "equal": equal}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = soak(Path(tmp), a.kills, a.steps, a.seed)
    print(
        f"{len(r['kills'])} kills, {r['launches']} launches; final weights equal the uninterrupted "
        f"run's: {r['equal']}"
    )
    raise SystemExit(0 if r["equal"] else 1)


if __name__ == "__main__":
    main()
