#!/usr/bin/env bash
# One short GPU check (under 8 minutes): install, the GPU-relevant tests, `make bench` on the GPU,
# a bf16 smoke run, and the single-GPU training tasks/s. Writes everything under ${OUT:-bench/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpu.txt"
[ -x .venv/bin/python ] || make install >"$OUT/install.log" 2>&1
export PYTHONUNBUFFERED=1
# maths and strategy equivalence (CPU and the CUDA device both exercised by the default suite)
.venv/bin/python -m pytest -q tests/test_maml.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
# strategies against the reference loop on the GPU, memory, reader
timeout 300 .venv/bin/python bench/bench.py --device cuda --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
# a short single-GPU training on synthetic data, fp32 then bf16: tasks/s from metrics.jsonl
.venv/bin/python - <<'PY' 2>&1 | tee "$OUT/train_gpu.txt"
import json, subprocess, sys, tempfile, pathlib
sys.path.insert(0, ".")
from tests.conftest import write_synthetic, small_overrides
tmp = pathlib.Path(tempfile.mkdtemp())
raw = write_synthetic(tmp / "raw")
for mp in ("no", "bf16"):
    args = small_overrides(raw, tmp, **{"model.hidden": 64, "train.meta_batch_size": 32, "train.steps": 60,
        "train.log_every": 10, "train.val_every": 1000, "data.train_episodes": 2000, "run.name": f"gpu-{mp}",
        "train.mixed_precision": mp})
    r = subprocess.run([sys.executable, "-m", "metadist", "train", *args], capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-2000:]); continue
    recs = [json.loads(x) for x in (tmp / "runs" / f"gpu-{mp}" / "metrics.jsonl").read_text().splitlines()]
    print(mp, "tasks/s", [round(x["tasks_per_s"], 1) for x in recs if "tasks_per_s" in x][1:], "gpu mem GB", recs[-1].get("gpu_mem_gb"))
PY
