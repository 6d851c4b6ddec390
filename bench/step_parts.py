"""Where a meta-step's time goes (`python bench/step_parts.py [TASKS]`): strong.yaml at a
meta-batch of TASKS (default 32), 4 tasks at once, in exact and fast mode, on random episodes,
one process. It sets the plan's own measurement of a chunk (the `auto` choice's figure: one chunk,
eager, repeated) beside the whole step and its parts: the chunks with their hand-over to the
reduction (`local`), the reduction over ranks, clipping and Adam. Medians of 6 (parts: of 4).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.adapt_latency import ms
from bench.bench import machine
from metadist import config
from metadist.algorithms import model_of
from metadist.data.synthetic import random_batch
from metadist.distributed import OneProcess
from metadist.step import Plan, build, runner

ROOT = Path(__file__).resolve().parents[1]
AT_ONCE = 4


def median_time(fn, rounds: int = 6) -> float:
    """Median seconds of fn() over `rounds` runs after one warm-up."""
    return ms(fn, rounds) / 1000


def parts(step, batch) -> tuple[float, float, float]:
    """(reduction, clipping, Adam) seconds of one step after its chunks."""
    votes = torch.zeros(3)
    step.optimizer.zero_grad(set_to_none=True)
    out = step.local(False, batch)
    t0 = time.perf_counter()
    step.reduction.reduce(out[2:], votes, 1)
    t1 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(step.param_list, step.s.clip)
    t2 = time.perf_counter()
    step.optimizer.step()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def row(reduce: str, tasks: int) -> str:
    cfg = config.load(
        ROOT / "configs/strong.yaml", [f"train.meta_batch_size={tasks}", f"train.reduce={reduce}"]
    )
    torch.manual_seed(0)
    model = model_of(cfg.model, cfg.algo, (1, 28, 28), 5)
    step = build(cfg, model, OneProcess(), Plan.fixed(AT_ONCE, reduce, tasks), tasks)
    batch, chunks = random_batch(tasks), tasks // AT_ONCE
    run = runner(step.trainable, random_batch, AT_ONCE, torch.device("cpu"))
    chunk = median_time(lambda: run(AT_ONCE))

    def local():
        step.optimizer.zero_grad(set_to_none=True)
        step.local(False, batch)

    chunked = median_time(local)
    whole = median_time(lambda: step(0, batch, lambda: torch.zeros(3)))
    parts(step, batch)
    red, clip, adam = (statistics.median(x) for x in zip(*[parts(step, batch) for _ in range(4)]))
    return (
        f"{reduce:<6} {chunks * chunk * 1e3:>9.0f} {tasks / (chunks * chunk):>8.1f} "
        f"{chunked * 1e3:>9.0f} {whole * 1e3:>9.0f} {tasks / whole:>8.1f} "
        f"{red * 1e3:>7.1f} {clip * 1e3:>6.1f} {adam * 1e3:>6.1f}"
    )


def main() -> None:
    tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    print(machine(torch.device("cpu")))
    print(f"strong.yaml, meta-batch {tasks}, {AT_ONCE} tasks at once, one process")
    print(
        f"{'reduce':<6} {'chunks ms':>9} {'tasks/s':>8} {'local ms':>9} {'step ms':>9} "
        f"{'tasks/s':>8} {'red ms':>7} {'clip':>6} {'Adam':>6}"
    )
    print("       (the plan's chunk x chunks)  (the step's chunks, the whole step, its parts)")
    for reduce in ("exact", "fast"):
        print(row(reduce, tasks), flush=True)


if __name__ == "__main__":
    main()
