"""`make bench-dist`: meta-training tasks/s with 1 and 2 processes on this machine (every GPU of
the node where there are GPUs), scaling efficiency, and the meta-gradient all-reduce time.

Each setting is a real `metadist train` run (accelerate launch for several processes) on a
synthetic Omniglot of the official layout; tasks/s is read from its metrics.jsonl, excluding the
first logged window (start-up), and the all-reduce time from the run's summary.
  python bench/bench_dist.py [--steps 30] [--hidden 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench import machine  # noqa: E402
from metadist.data.synthetic import write_synthetic  # noqa: E402
from metadist.distributed import accelerate_launch, free_port  # noqa: E402


def run(nproc: int, args: list[str]) -> dict:
    if nproc == 1:
        cmd = [sys.executable, "-m", "metadist", "train", *args]
    else:
        cmd = [
            *accelerate_launch(),
            "--multi_gpu",
            "--num_processes",
            str(nproc),
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
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    # the last override wins, as in train
    last = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args}
    run_dir = Path(last["run.root"]) / last["run.name"]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tasks_per_s"] for r in recs if "tasks_per_s" in r][1:]
    s = json.loads((run_dir / "summary.json").read_text())
    return {
        "processes": nproc,
        "tasks_per_s": statistics.median(tps),
        "allreduce_ms_per_step": s.get("allreduce_ms_per_step", 0.0),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dist.json"))
    a = ap.parse_args()
    gpus = torch.cuda.device_count()
    counts = [1, 2] if gpus < 2 else sorted({1, 2, gpus})
    device = torch.device("cuda" if gpus else "cpu")
    print(f"machine: {machine(device)}; second-order MAML, 5-way 1-shot, meta-batch 32")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = write_synthetic(tmp / "raw")
        base = [
            f"{k}={v}"
            for k, v in {
                "data.raw": raw,
                "data.shards": tmp / "shards",
                "data.train_episodes": 2000,
                "data.val_episodes": 16,
                "data.test_episodes": 24,
                "data.episodes_per_shard": 500,
                "run.root": tmp / "runs",
                "tracking.mode": "disabled",
                "model.hidden": a.hidden,
                "train.meta_batch_size": 32,
                "train.steps": a.steps,
                "train.log_every": 5,
                "train.val_every": 10**6,
                "train.checkpoint_every": 10**6,
                "eval.test_episodes": 8,
                "eval.tasks_per_batch": 8,
            }.items()
        ]
        subprocess.run(
            [sys.executable, "-m", "metadist", "prepare", *base],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        rows = []
        print(
            f"{'processes':>9} {'tasks/s':>9} {'speed-up':>9} {'efficiency':>11} "
            f"{'all-reduce ms/step':>19}"
        )
        for n in counts:
            r = run(n, base + [f"run.name=p{n}"])
            r["speedup"] = r["tasks_per_s"] / rows[0]["tasks_per_s"] if rows else 1.0
            r["efficiency"] = r["speedup"] / n
            rows.append(r)
            print(
                f"{n:>9} {r['tasks_per_s']:>9.1f} {r['speedup']:>8.2f}x {r['efficiency']:>10.0%} "
                f"{r['allreduce_ms_per_step']:>19.2f}",
                flush=True,
            )
    out = {"machine": machine(device), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
