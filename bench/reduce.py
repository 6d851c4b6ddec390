"""What the exact reduction costs (make bench-reduce): train.reduce=exact against fast, on this CPU.

1. Meta-step time, one process: fast (a rank's tasks in one graph, or in chunks, accumulated
   .grad) against exact (fixed groups of tasks, each group's gradient a leaf of the tree: groups
   of B/4, the default for 1/2/4 processes, and one task at a time), the strong.yaml shape
   (second-order 5-way 1-shot, learned rates) and first order; interleaved rounds. Run it under
   `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` for an AVX2 machine's kernels.
2. Memory: the bytes the autograd graph holds (saved tensors, counted by hooks) for the largest
   chunk, plus exact mode's gradient buffers (one per tree level, each the size of the gradient).
3. The reduction itself between 2 processes (gloo, this machine): all-reduce against the exact
   all-to-all + tree merge + all-gather, for the Conv4 gradient and a ResNet-12-sized one; bytes
   each moves per rank; and a model for 8 GPUs (ring at a stated bandwidth and latency).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metadist import config, machine
from metadist.algorithms import model_of
from metadist.data.synthetic import random_batch
from metadist.distributed import OneProcess
from metadist.step import Plan, build

ROOT = Path(__file__).resolve().parents[1]


def batch(tasks, ways=5):
    return random_batch(tasks, ways)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves while fn runs (each storage counted once)."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def step_times(rounds: int, quick: bool):
    rows = []
    settings = [(8, False), (32, False), (8, True), (32, True)] if not quick else [(8, False)]
    for tasks, first_order in settings:
        g = tasks // 4
        variants = {
            "fast": ("fast", 0),
            f"fast, {g} at once": ("fast", g),
            f"exact, groups of {g}": ("exact", g),
            f"exact, groups of {2 * g}": ("exact", 2 * g),
            "exact, groups of 1": ("exact", 1),
        }
        steps, mem = {}, {}
        for name, (reduce, at_once) in variants.items():
            cfg = config.load(
                ROOT / "configs/strong.yaml",
                [
                    f"train.meta_batch_size={tasks}",
                    f"algo.first_order={first_order}",
                    f"train.reduce={reduce}",
                ],
            )
            torch.manual_seed(0)
            model = model_of(cfg.model, cfg.algo, (1, 28, 28), 5)
            s = build(cfg, model, OneProcess(), Plan.fixed(at_once, reduce, tasks), tasks)
            steps[name] = s
            chunk = {k: v[: at_once or tasks] for k, v in batch(tasks).items()}
            n = sum(p.numel() for p in s.param_list)
            # the tree's buffers: one per level
            grad_buffers = (tasks // at_once).bit_length() * 4 * n if reduce == "exact" else 0
            mem[name] = (saved_bytes(lambda s=s, c=chunk: s.local(False, c)), grad_buffers)
        b = batch(tasks)
        best = dict.fromkeys(steps, float("inf"))
        for r in range(rounds + 1):
            for name, s in steps.items():
                t = time.perf_counter()
                s(0, b, lambda: torch.zeros(3))
                if r:
                    best[name] = min(best[name], time.perf_counter() - t)
        for name in steps:
            rows.append(
                {
                    "tasks": tasks,
                    "order": 1 if first_order else 2,
                    "mode": name,
                    "step_ms": 1000 * best[name],
                    "ratio_to_fast": best[name] / best["fast"],
                    "ratio_to_fast_same_groups": best[name] / best[f"fast, {tasks // 4} at once"],
                    "graph_mb": mem[name][0] / 1e6,
                    "grad_buffers_mb": mem[name][1] / 1e6,
                }
            )
    return rows


WORKER = r"""
import json, os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, os.environ["METADIST_ROOT"])
from metadist.step import reduce
from metadist.distributed import Dist
d = Dist(60.0)
out = {}
for name, n in json.loads(os.environ["SIZES"]).items():
    e = reduce.Exact(d, [torch.zeros(n)], 8, 1)   # 8 groups over the ranks
    g = torch.randn(e.n_grad + e.extra)   # padded to a multiple of the world size, as Exact does
    mine = [(a, s, g.clone()) for a, s in e.layout[d.rank]]
    runs = (("allreduce", lambda: dist.all_reduce(g.clone())),
            ("exact", lambda: e._mean(mine, 0)))
    for what, fn in runs:
        fn(); dist.barrier()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        dist.barrier()
        out[f"{name}/{what}"] = (time.perf_counter() - t) / 10
if d.rank == 0:
    print("RESULT", json.dumps(out))
d.close()
"""

CONV4 = 112_019  # strong.yaml's meta-parameters (weights + learned rates)
# ResNet-12 64-160-320-640 at 5 ways (weights + BatchNorm + head)
RESNET12 = 12_424_000


def reduction_times():
    env = dict(
        os.environ,
        METADIST_ROOT=str(ROOT),
        SIZES=json.dumps({"conv4": CONV4, "resnet12": RESNET12}),
        OMP_NUM_THREADS="1",
        METADIST_CPU="1",
    )
    port = str(29500 + os.getpid() % 1000)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={port}",
            "--no-python",
            sys.executable,
            "-c",
            WORKER,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(line[0][7:])


def model_8_gpus(n: int, bandwidth=100e9, latency=10e-6, gpus=8):
    """Seconds per step for `gpus` devices at `bandwidth` bytes/s per link and `latency` per
    message: ring all-reduce (reduce-scatter + all-gather: 2(G-1) messages of 1/G of the gradient)
    against exact (all-to-all: G-1 messages of 1/G, then all-gather: G-1 more): the same bytes and
    count."""
    b = 4 * n
    ring = 2 * (gpus - 1) * (latency + b / gpus / bandwidth)
    exact_t = (gpus - 1) * (latency + b / gpus / bandwidth) * 2
    return ring, exact_t, 2 * (gpus - 1) / gpus * b


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    print(
        f"CPU: {machine.cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("\nmeta-step time and memory, one process (strong.yaml shape, batched):")
    print(
        f"{'tasks':>5} {'order':>5} {'mode':<26} {'step ms':>9} {'vs fast':>8} {'graph MB':>9} "
        f"{'grad buffers MB':>16}"
    )
    for r in step_times(args.rounds, args.quick):
        print(
            f"{r['tasks']:>5} {r['order']:>5} {r['mode']:<26} {r['step_ms']:>9.1f} "
            f"{r['ratio_to_fast']:>7.2f}x "
            f"{r['graph_mb']:>9.1f} {r['grad_buffers_mb']:>16.2f}"
        )
    print("\nthe reduction between 2 processes (gloo, 1 thread each), ms per step:")
    t = reduction_times()
    for name, n in (("conv4", CONV4), ("resnet12", RESNET12)):
        ring_bytes = 2 * (2 - 1) / 2 * 4 * n
        print(
            f"  {name:<9} {4 * n / 1e6:7.2f} MB gradient: all-reduce "
            f"{1000 * t[name + '/allreduce']:8.2f} ms, "
            f"exact {1000 * t[name + '/exact']:8.2f} ms "
            f"({t[name + '/exact'] / t[name + '/allreduce']:.2f}x); "
            f"bytes sent per rank: both {ring_bytes / 1e6:.2f} MB"
        )
    print(
        "\nmodel, 8 GPUs on a ring at 100 GB/s per link and 10 us per hop (stated, not measured):"
    )
    for name, n in (("conv4", CONV4), ("resnet12", RESNET12)):
        ring, ex, moved = model_8_gpus(n)
        print(
            f"  {name:<9} all-reduce {1000 * ring:6.3f} ms, exact {1000 * ex:6.3f} ms, "
            f"{moved / 1e6:.2f} MB per rank each"
        )


if __name__ == "__main__":
    main()
