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
- With `algo.tasks_per_chunk=0` on a CPU, `auto` also measures how many tasks the batched
  strategy computes at once (`tasks_at_once`: 2, 4, 8, 16, up to a rank's tasks): folded tasks make
  activations that many times larger, and once they leave the CPU's caches the memory-bound
  BatchNorm, ReLU and pooling (and their double backward) slow down more than the folding gains
  (on an Intel Xeon, 5-way 1-shot second order: 8 at once 1.36x the exercise's loop, all 32 at
  once 1.07x). Sizes whose measurement would take more than MEASURE_SECONDS are left out.
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
SIZES = (2, 4, 8, 16)  # tasks at once the batched strategy is measured with
MEASURE_SECONDS = 6.0  # the most one size's measurement (every round) may take


def sizes(most: int, task_seconds: float, rounds: int) -> list[int]:
    """The tasks-at-once sizes worth measuring for a rank of `most` tasks (SIZES below it, and
    `most` up to 16), those whose `rounds` cost at most MEASURE_SECONDS at `task_seconds` a
    task; at least the smallest."""
    top = min(most, SIZES[-1])
    out = sorted({c for c in SIZES if c < top} | {top})
    return [c for c in out if c * task_seconds * rounds <= MEASURE_SECONDS] or out[:1]


def measure(run_chunk, at_once: list[int], rounds: int = 2) -> dict[str, float]:
    """Tasks/s of the loop and of the batched strategy with each size of `at_once` ("batched/8":
    8 tasks at once; "batched" when there is one size): `run_chunk(strategy, size) -> tasks`
    runs that many tasks' meta-backward; interleaved, best of `rounds` after a warm-up round."""
    runs = {"loop": ("loop", min(at_once))}
    for c in at_once:
        runs[f"batched/{c}" if len(at_once) > 1 else "batched"] = ("batched", c)
    best = dict.fromkeys(runs, 0.0)
    for r in range(rounds + 1):
        for name, (strategy, size) in runs.items():
            t = time.perf_counter()
            tasks = run_chunk(strategy, size)
            if r:
                best[name] = max(best[name], tasks / (time.perf_counter() - t))
    return best


def task_seconds(run_chunk) -> float:
    """One task's meta-backward time (the loop on one task, after one warm-up)."""
    run_chunk("loop", 1)
    t = time.perf_counter()
    run_chunk("loop", 1)
    return time.perf_counter() - t


def pick(run_chunk, most: int, free: bool) -> dict:
    """{strategy, tasks_at_once, tasks_per_s}, measured now: with `free`, the batched strategy at
    several tasks at once up to `most` (tasks_at_once: the size chosen, 0 for the loop); else at
    `most` (tasks_at_once 0: the settings' own)."""
    at_once = sizes(most, task_seconds(run_chunk), 3) if free else [most]
    speed = measure(run_chunk, at_once)
    strategy, _, size = max(speed, key=speed.get).partition("/")
    return {"strategy": strategy, "tasks_at_once": int(size) if size else 0, "tasks_per_s": speed}


def cached_choice(shape: dict, run_chunk, most: int, free: bool, say=print) -> dict:
    """`pick`, once per machine and shape (see `cached`)."""
    return cached(
        "strategy", dict(shape, at_once=[most, free]), lambda: pick(run_chunk, most, free), say
    )


def choose(
    requested: str, device: torch.device, shape: dict, run_chunk, most: int, free: bool, say=print
) -> dict:
    """{strategy, why, tasks_at_once, ...}: what this run uses (before any checkpoint says
    otherwise); `most`, `free`: see cached_choice (free: only `auto` on a CPU uses it)."""
    if requested != "auto":
        return {"strategy": requested, "why": f"algo.strategy={requested}", "tasks_at_once": 0}
    if device.type != "cpu":
        return {
            "strategy": "batched",
            "why": f"algo.strategy=auto on {device.type}: batched",
            "tasks_at_once": 0,
        }
    rec = cached_choice(shape, run_chunk, most, free, say)
    speeds = ", ".join(f"{k} {v:.1f}" for k, v in rec["tasks_per_s"].items())
    where = (
        f"cached in {rec['cache']}"
        if rec.get("cached")
        else (f"measured now, cached in {rec['cache']}" if rec.get("cache") else "measured now")
    )
    chosen = rec["strategy"] + (
        f", {rec['tasks_at_once']} tasks at once" if rec.get("tasks_at_once") else ""
    )
    return dict(rec, why=f"algo.strategy=auto on this CPU: {speeds} tasks/s ({where}): {chosen}")


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
