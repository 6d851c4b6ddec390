"""Behaviour fingerprint: a fixed list of training commands, each reduced to the sha256 of its
final weights (every tensor's bytes, by name) and its test accuracy. A refactor that keeps
behaviour gives the same lines; `--compare OLD.json` says which command changed.

  python bench/fingerprint.py --out before.json                # on the old commit
  python bench/fingerprint.py --out after.json --compare before.json

Commands (one process unless said; the strategy cache is a folder of this run, so `auto` is
measured once and shared by every command, and the strategy is pinned where it matters):
  strong       configs/strong.yaml, 20 steps on real Omniglot (batched)
  boss         configs/boss.yaml, 12 steps (one task at a time, task augmentation)
  protonet     configs/protonet.yaml, 20 steps (the budget schedule's probe is never reached)
  resnet12     ResNet-12 (narrow widths, DropBlock) at 84x84 RGB on a synthetic folder dataset, 2
  steps folder       Conv4-32 at 84x84 RGB on the synthetic folder dataset, 5 steps
  (data.source=folder) folder10     the same, 10 steps, exact reduction
  resumed      strong, 20 steps, relaunched from its step-10 checkpoint
  exact2       2 processes (accelerate launch, gloo), exact reduction, 10 steps, train.threads=1
Needs ../shared/data/omniglot (or $OMNIGLOT_DIR). About 6 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def weights_digest(path: Path) -> str:
    from safetensors.torch import load_file

    w = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode() + b"\0" + w[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def run(cmd: list[str], env: dict, cwd: Path) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="")
    p.add_argument("--compare", default="")
    p.add_argument("--only", default="", help="comma-separated command names")
    p.add_argument("--work", default="", help="working folder (default: a temporary one, removed)")
    args = p.parse_args()
    omniglot = os.environ.get("OMNIGLOT_DIR") or str(ROOT.parent / "shared" / "data" / "omniglot")
    work = Path(args.work or tempfile.mkdtemp(prefix="fingerprint-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, METADIST_CACHE_DIR=str(work / "cache"), OMNIGLOT_DIR=omniglot)
    py = [sys.executable, "-m", "metadist"]
    common = [f"run.root={work / 'runs'}", "tracking.mode=disabled"]
    real = [
        f"data.raw={omniglot}",
        f"data.shards={work / 'shards' / 'omniglot'}",
        "data.train_episodes=2000",
        "eval.test_episodes=64",
    ]
    from metadist.data.synthetic import FolderSpec, write_folder_dataset

    folder_raw = work / "folderdata"
    if not folder_raw.exists():
        write_folder_dataset(
            folder_raw, "fractions", FolderSpec(classes=25, images=12, size=84, channels=3)
        )
    folder = [
        "data.source=folder",
        f"data.raw={folder_raw}",
        "data.image_size=84",
        "data.channels=3",
        f"data.shards={work / 'shards' / 'folder'}",
        "data.train_episodes=200",
        "data.val_episodes=8",
        "data.test_episodes=16",
        "data.queries=3",
        "eval.tasks_per_batch=8",
        "eval.inner_steps=3",
        "eval.val_inner_steps=1",
    ]
    short = ["train.val_every=10", "train.checkpoint_every=10", "train.log_every=5"]
    commands = {
        "strong": [
            "train",
            "--config",
            "configs/strong.yaml",
            *real,
            *short,
            "train.steps=20",
            "run.name=strong",
            "algo.strategy=batched",
        ],
        "boss": [
            "train",
            "--config",
            "configs/boss.yaml",
            *real,
            *short,
            "train.steps=12",
            "run.name=boss",
            "algo.tasks_per_chunk=1",
        ],
        "protonet": [
            "train",
            "--config",
            "configs/protonet.yaml",
            *real,
            *short,
            "train.steps=20",
            "run.name=protonet",
        ],
        "resnet12": [
            "train",
            *folder,
            "model.backbone=resnet12",
            "model.widths=8,16,16,32",
            "model.dropblock=0.1",
            "train.meta_batch_size=2",
            "algo.inner_steps=2",
            "algo.inner_lr=0.01",
            "train.steps=2",
            "train.val_every=2",
            "train.checkpoint_every=2",
            "run.name=resnet12",
            "algo.strategy=batched",
        ],
        "folder": [
            "train",
            *folder,
            "model.hidden=32",
            "algo.inner_steps=2",
            "algo.inner_lr=0.01",
            "train.meta_batch_size=4",
            "train.steps=5",
            "train.val_every=5",
            "train.checkpoint_every=5",
            "run.name=folder",
            "algo.strategy=batched",
            "train.reduce=fast",
        ],
        "folder10": [
            "train",
            *folder,
            "model.hidden=32",
            "algo.inner_steps=2",
            "algo.inner_lr=0.01",
            "train.meta_batch_size=4",
            "train.steps=10",
            "train.val_every=5",
            "train.checkpoint_every=5",
            "run.name=folder10",
            "algo.tasks_per_chunk=1",
            "train.reduce=exact",
        ],
        "resumed": [
            "train",
            "--config",
            "configs/strong.yaml",
            *real,
            *short,
            "train.steps=20",
            "run.name=resumed",
            "algo.strategy=batched",
        ],
        "exact2": [
            "train",
            "--config",
            "configs/strong.yaml",
            *real,
            *short,
            "train.steps=10",
            "run.name=exact2",
            "train.reduce=exact",
            "train.threads=1",
            "algo.strategy=batched",
        ],
    }
    only = [c for c in args.only.split(",") if c] or list(commands)
    results = {}
    for name in only:
        cmd = py + commands[name] + common
        t = time.perf_counter()
        run_dir = work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        if name == "resumed":
            run(cmd, env, ROOT)
            shutil.rmtree(run_dir / "checkpoints" / "step_000020")
            for f in ("model.safetensors", "summary.json"):
                (run_dir / f).unlink()
            run(cmd, env, ROOT)
        elif name == "exact2":
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            acc = [
                str(Path(sys.executable).with_name("accelerate")),
                "launch",
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
                str(port),
                "-m",
                "metadist",
            ]
            run(acc + commands[name] + common, env, ROOT)
        else:
            run(cmd, env, ROOT)
        summary = json.loads((run_dir / "summary.json").read_text())
        results[name] = {
            "weights": weights_digest(run_dir / "model.safetensors"),
            "best": weights_digest(run_dir / "best.safetensors")
            if (run_dir / "best.safetensors").is_file()
            else "",
            "test_accuracy": summary["test_accuracy"],
            "steps": summary["steps"],
        }
        print(
            f"{name:9s} {results[name]['weights']} best {results[name]['best']} "
            f"test {summary['test_accuracy']:.4f} ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        bad = [n for n in results if n in old and results[n] != old[n]]
        for n in bad:
            print(f"CHANGED {n}: {old[n]} -> {results[n]}")
        print("same weights for every command" if not bad else f"{len(bad)} command(s) changed")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
