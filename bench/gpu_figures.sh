#!/usr/bin/env bash
# The GPU figures not yet measured (docs/results.md), one run of under 8 minutes on one GPU (bounded
# by timeouts): `OUT=$OUT bash bench/gpu_figures.sh` (with .gpudata/omniglot holding the Omniglot
# zips for the real-data part). Everything lands in $OUT:
#   1. train_vs_step.txt: `metadist train` tasks/s against its own graphed meta-step (bench.py
#      --only meta: the "graph" row), second-order 5-way 1-shot meta-batch 32 and 20-way meta-batch 16;
#      eager and graph runs must end with equal weights.
#   2. scaling.txt/.json/.png: bench/scaling.py on the GPU (meta-step time against tasks per rank).
#   3. metabatch.jsonl: accuracy against steps for meta-batch 8, 32, 128, 256 on real Omniglot
#      (alphabets protocol), meta lr 2e-3 * sqrt(B / 8) with 100 warm-up steps, cosine, each run
#      bounded in minutes; bench/curve.py reads every checkpoint's val and test accuracy.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L | tee "$OUT/gpu.txt"
# 1. training against its own step
timeout ${STEP_SECONDS:-120} $PY bench/bench.py --quick --only meta --device cuda --out "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
timeout ${TRAIN_SECONDS:-150} $PY - <<'PY' 2>&1 | tee "$OUT/train_vs_step.txt"
import json, subprocess, sys, tempfile, pathlib
from safetensors.torch import load_file
sys.path.insert(0, ".")
from metadist.data.synthetic import write_synthetic
tmp = pathlib.Path(tempfile.mkdtemp()); raw = write_synthetic(tmp / "raw")
for ways, batch in ((5, 32), (20, 16)):
    for graph in ("off", "on"):
        name = f"w{ways}-{graph}"
        args = [f"data.raw={raw}", f"data.shards={tmp}/shards{ways}", f"data.ways={ways}", "data.train_episodes=2000",
                "data.val_episodes=32", "data.test_episodes=32", "data.episodes_per_shard=500", f"run.root={tmp}/runs",
                f"run.name={name}", "tracking.mode=disabled", f"train.meta_batch_size={batch}", "train.steps=300",
                "train.log_every=50", "train.val_every=1000", "train.checkpoint_every=1000", f"train.cuda_graph={graph}",
                "algo.learn_inner_lr=layer", "eval.tasks_per_batch=32", "data.task_aug=0.4"]
        r = subprocess.run([sys.executable, "-m", "metadist", "train", *args], capture_output=True, text=True)
        if r.returncode:
            print(name, "FAILED", r.stderr[-2000:]); continue
        recs = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        tps = sorted(x["tasks_per_s"] for x in recs if "tasks_per_s" in x)[1:]
        print(f"{ways}-way meta-batch {batch} cuda_graph={graph}: train {tps[len(tps) // 2]:.0f} tasks/s")
    a, b = (load_file(str(tmp / "runs" / f"w{ways}-{g}" / "model.safetensors")) for g in ("off", "on"))
    print(f"{ways}-way: graph and eager weights equal: {all((a[k] == b[k]).all().item() for k in a)}")
PY
grep -E "graph|reference" "$OUT/bench_gpu.txt" | tee -a "$OUT/train_vs_step.txt"
# 2. scaling
timeout ${SCALING_SECONDS:-90} $PY bench/scaling.py --device cuda --rounds 5 --out "$OUT/scaling.json" > "$OUT/scaling.txt" 2>&1
# 3. meta-batch study (real data)
if [ -d .gpudata/omniglot ]; then
  export OMNIGLOT_DIR=$PWD/.gpudata/omniglot
  $PY -m metadist prepare > /tmp/prepare.log 2>&1
  for B in 8 32 128 256; do
    LR=$($PY -c "print(2e-3 * ($B / 8) ** 0.5)")
    ( timeout ${STUDY_SECONDS:-180} $PY -m metadist train --config configs/strong.yaml run.root=/tmp/study run.name=b$B \
        train.meta_batch_size=$B train.meta_lr=$LR train.warmup_steps=100 train.steps=3000 train.max_minutes=2.5 \
        train.checkpoint_every=100 train.keep_checkpoints=100 train.val_every=1000 tracking.mode=disabled \
        eval.test_episodes=64 > /tmp/study_b$B.log 2>&1 ) &
  done
  wait
  for B in 8 32 128 256; do timeout 60 $PY bench/curve.py /tmp/study/b$B --splits test --out "$OUT/metabatch.jsonl" > /dev/null 2>&1; done
fi
echo done
