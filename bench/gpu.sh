#!/usr/bin/env bash
# One short GPU check (about 4 minutes): the strategy benchmark on the GPU (reference loop, batched,
# loop and the batched step replayed as a CUDA graph, each with its float64 meta-gradient error),
# then real `metadist train` runs on synthetic data with train.cuda_graph=off / on and bf16 + graph:
# tasks/s, and the graph run's losses and weights against the eager run's.
# Works with the project's .venv, or with a machine's own PyTorch plus wheels in .whl/ (no network).
# Everything lands in ${OUT:-bench/results}.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L
timeout ${BENCH_SECONDS:-150} $PY bench/bench.py --quick --only meta --device cuda --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
$PY - <<'PY' 2>&1 | tee "$OUT/train_gpu.txt"
import json, subprocess, sys, tempfile, pathlib
import torch
from safetensors.torch import load_file
sys.path.insert(0, ".")
from metadist.data.synthetic import write_synthetic
def small_overrides(raw, tmp, **extra):
    base = {"data.raw": raw, "data.shards": tmp / "shards", "data.train_episodes": 96, "data.val_episodes": 16,
            "data.test_episodes": 24, "data.episodes_per_shard": 16, "run.root": tmp / "runs", "run.name": "t",
            "tracking.mode": "disabled", "train.val_every": 2, "eval.tasks_per_batch": 8}
    return [f"{k}={v}" for k, v in dict(base, **extra).items()]
tmp = pathlib.Path(tempfile.mkdtemp())
raw = write_synthetic(tmp / "raw")
runs = {"eager": ("no", "off"), "graph": ("no", "on"), "bf16-graph": ("bf16", "on")}
recs = {}
for name, (mp, graph) in runs.items():
    args = small_overrides(raw, tmp, **{"model.hidden": 64, "train.meta_batch_size": 32, "train.steps": 200,
        "train.log_every": 20, "train.val_every": 100, "data.train_episodes": 2000, "run.name": name,
        "train.mixed_precision": mp, "train.cuda_graph": graph, "algo.learn_inner_lr": "layer"})
    r = subprocess.run([sys.executable, "-m", "metadist", "train", *args], capture_output=True, text=True)
    if r.returncode:
        print(name, "FAILED", r.stderr[-3000:]); continue
    recs[name] = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    tps = [x["tasks_per_s"] for x in recs[name] if "tasks_per_s" in x][2:]
    print(f"{name:<11} tasks/s median {sorted(tps)[len(tps) // 2]:8.1f}  val {[round(x['val_accuracy'], 3) for x in recs[name] if 'val_accuracy' in x]}"
          f"  gpu mem {recs[name][-1].get('gpu_mem_gb', 0):.2f} GB")
if "eager" in recs and "graph" in recs:
    le = [x["loss"] for x in recs["eager"] if "loss" in x]
    lg = [x["loss"] for x in recs["graph"] if "loss" in x]
    print("loss eager", [round(v, 4) for v in le])
    print("loss graph", [round(v, 4) for v in lg])
    we, wg = (load_file(str(tmp / "runs" / n / "model.safetensors")) for n in ("eager", "graph"))
    rel = max(((we[k] - wg[k]).norm() / we[k].norm().clamp_min(1e-12)).item() for k in we)
    print(f"first logged loss: eager {le[0]:.6f} graph {lg[0]:.6f}; after 200 steps max relative weight difference {rel:.2e}")
PY
