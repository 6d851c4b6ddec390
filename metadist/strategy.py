"""Which strategy runs a rank's tasks (`batched`: tasks folded into one network; `loop`: one at a
time): the one owner of the rule, the measurement, its cache and its record.

- `algo.strategy=batched|loop`: used as asked.
- `auto` on CUDA: batched (the per-task loop is launch-bound there).
- `auto` on a CPU: whichever is faster depends on the CPU, and the two round float32 differently,
  so a choice made from one noisy measurement would make the same command give different weights.
  The choice is a property of the machine and the run's shape instead: measured once and kept in
  the per-machine cache (metadist/machine.py), keyed by the machine and the shape of a chunk of
  tasks (backbone, image, episode, algorithm); every later run on that machine with that shape
  reads the same answer.
- A run records what it used and why (`<run>/strategy.json`, and every checkpoint's state), and a
  resumed run keeps it, whatever the cache says by then.
- `exact_grouping`: whether train.reduce=exact may compute a rank's tasks as one group and take
  each task's own gradient from it (metadist.algorithms.core.task_gradients), which needs a task's
  gradient to be the same bits in every group size. That holds where the kernels work on each
  task's channels alone, whatever the group (checked on an Intel Xeon with AVX-512), but it is a
  property of the kernels: it is checked once per machine and shape, on the run's own episodes, in
  every group size the run could use at any world size (so every world size makes the same
  choice), and cached like the strategy.
"""

from __future__ import annotations

import time

import torch

from metadist.machine import cached

STRATEGIES = ("batched", "loop")


def measure(run_chunk, rounds: int = 2) -> dict[str, float]:
    """Tasks/s of each strategy: `run_chunk(strategy) -> tasks` runs one chunk's meta-backward;
    interleaved, best of `rounds` after a warm-up round."""
    best = dict.fromkeys(STRATEGIES, 0.0)
    for r in range(rounds + 1):
        for strategy in STRATEGIES:
            t = time.perf_counter()
            tasks = run_chunk(strategy)
            if r:
                best[strategy] = max(best[strategy], tasks / (time.perf_counter() - t))
    return best


def cached_choice(shape: dict, run_chunk, say=print) -> dict:
    """The measured strategy for this machine and shape (see `cached`)."""

    def compute():
        speed = measure(run_chunk)
        return {"strategy": max(speed, key=speed.get), "tasks_per_s": speed}

    return cached("strategy", shape, compute, say)


def choose(requested: str, device: torch.device, shape: dict, run_chunk, say=print) -> dict:
    """{strategy, why, ...}: what this run uses (before any checkpoint says otherwise)."""
    if requested != "auto":
        return {"strategy": requested, "why": f"algo.strategy={requested}"}
    if device.type != "cpu":
        return {"strategy": "batched", "why": f"algo.strategy=auto on {device.type}: batched"}
    rec = cached_choice(shape, run_chunk, say)
    speeds = ", ".join(f"{k} {v:.1f}" for k, v in rec["tasks_per_s"].items())
    where = (
        f"cached in {rec['cache']}"
        if rec.get("cached")
        else (f"measured now, cached in {rec['cache']}" if rec.get("cache") else "measured now")
    )
    return dict(
        rec, why=f"algo.strategy=auto on this CPU: {speeds} tasks/s ({where}): {rec['strategy']}"
    )


def exact_grouping(shape: dict, task_grads, sizes: list[int], say=print) -> dict:
    """{"per_task": whether each task's gradient is bit-identical in groups of every size in
    `sizes` (those a run may use at any world size), "groups": sizes}, for this machine and shape
    (cached). `task_grads(size)` -> (tasks, n): the per-task gradients of one fixed sample of
    max(sizes) tasks, computed in groups of `size`."""

    def compute():
        ref = task_grads(max(sizes))
        same = all(torch.equal(ref, task_grads(g)) for g in sizes[:-1])
        return {"per_task": bool(same), "groups": list(sizes)}

    return cached("grouping", dict(shape, groups=list(sizes)), compute, say)
