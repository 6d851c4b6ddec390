#!/usr/bin/env bash
# One GPU run (about 9 minutes), for a machine that has PyTorch but cannot
# install (wheels of webdataset and braceexpand travel in .whl/, the Omniglot zips in
# .gpudata/omniglot/). Everything it measures lands in $OUT:
#   1. recipes: several training recipes on real Omniglot side by side, bounded in steps, with a
#      checkpoint every 250 steps; bench/curve.py then gives each checkpoint's val and test
#      accuracy (10 inner steps). Accuracy at equal steps is what carries over to the CPU: a CPU
#      run's time is steps / its steps per second there (measured on the CPU, not here).
#   2. the strategy benchmark on the GPU (bench/bench.py --quick --device cuda), and a bf16 check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
LOG=/tmp/gpu_logs; rm -rf "$LOG" /tmp/runs; mkdir -p "$LOG"   # at most 8 files come back: logs travel as one tar
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
PY=${PY:-python3}
nvidia-smi -L | tee "$LOG/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$LOG/gpu.txt"
export OMNIGLOT_DIR=$PWD/.gpudata/omniglot
( $PY -m metadist prepare >"$LOG/prepare.log" 2>&1 ) &
( $PY -m metadist prepare data.queries=2 >"$LOG/prepare_q2.log" 2>&1 ) &
wait
tail -2 "$LOG/prepare.log"

common="run.root=/tmp/runs tracking.mode=disabled train.checkpoint_every=250 train.keep_checkpoints=100 train.val_every=500 train.log_every=50 train.max_minutes=${RECIPE_MINUTES:-4} eval.test_episodes=64"
declare -A R=(
  [boss]="--config configs/boss.yaml train.steps=2000"
  [boss_layer]="--config configs/boss.yaml train.steps=2000 algo.learn_inner_lr=layer"
  [boss_element]="--config configs/boss.yaml train.steps=2000 algo.learn_inner_lr=element"
  [boss_layer_lr3]="--config configs/boss.yaml train.steps=2000 algo.learn_inner_lr=layer train.meta_lr=0.003"
  [boss_q2]="--config configs/boss.yaml train.steps=2000 data.queries=2"
  [boss_layer_b16]="--config configs/boss.yaml train.steps=1000 train.meta_batch_size=16 train.meta_lr=0.003 algo.learn_inner_lr=layer"
  [boss_layer_in2]="--config configs/boss.yaml train.steps=1200 algo.inner_steps=2 algo.learn_inner_lr=layer"
  [strong_layer]="--config configs/strong.yaml train.steps=2000 algo.learn_inner_lr=layer"
  [boss_layer_30]="--config configs/boss.yaml train.steps=6000 algo.learn_inner_lr=layer train.checkpoint_every=500"
  [strong_layer_30]="--config configs/strong.yaml train.steps=6000 algo.learn_inner_lr=layer train.checkpoint_every=500"
)
for name in "${!R[@]}"; do
  ( $PY -m metadist train ${R[$name]} $common run.name=$name >"$LOG/train_$name.log" 2>&1 ) &
done
wait
for name in "${!R[@]}"; do tail -c 300 "$LOG/train_$name.log" | tr '\r' '\n' | tail -1; done
for name in "${!R[@]}"; do
  ( timeout 120 $PY bench/curve.py /tmp/runs/$name --out "$LOG/curve_$name.jsonl" >"$LOG/curve_$name.txt" 2>&1 ) &
done
wait
cat "$LOG"/curve_*.jsonl > "$LOG/curves.jsonl"
for name in "${!R[@]}"; do cat "$LOG/curve_$name.txt"; done
timeout ${BENCH_SECONDS:-100} $PY bench/bench.py --quick --device cuda --only meta --out "$LOG/bench_gpu.json" 2>&1 | tee "$LOG/bench_gpu.txt"
cp "$LOG/curves.jsonl" "$LOG/bench_gpu.txt" "$OUT/" 2>/dev/null
for r in /tmp/runs/*/; do n=$(basename $r); mkdir -p "$LOG/runs/$n"; cp $r/metrics.jsonl $r/summary.json $r/config.yaml "$LOG/runs/$n/" 2>/dev/null; done
tar czf "$OUT/logs.tgz" -C "$LOG" .
echo done
