"""Training speed against the exercise's loop (make bench-train): whole meta-steps of strong.yaml
(second-order MAML, 5-way 1-shot, learned inner rates) at a meta-batch of 32 on this CPU, as
`metadist train` runs them (MetaStep: the meta-backward, the reduction, Adam), against the
exercise's per-task loop (bench/reference.py) with its Adam step, on the same episodes,
interleaved rounds, median tasks/s.

Variants: fast mode with every task at once (what `algo.strategy=batched` does), with the tasks at
once `algo.strategy=auto` measured on this machine (metadist/step/plan.py), one task at a time;
exact mode's fixed groups of B/4 (1, 2 and 4 processes) and one task at a time; and
`algo.compile=on` (metadist/step/compute.py; its first round, the
warm-up, compiles).

  python bench/train_speed.py [--rounds 6] [--meta-batch 32] [--first-order]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench import machine as machine_line
from bench.reduce import batch
from bench.reference import with_adam
from metadist import config
from metadist.algorithms import model_of
from metadist.distributed import OneProcess
from metadist.step import Plan, runner
from metadist.step import build as build_step
from metadist.step import plan as plan_mod

ROOT = Path(__file__).resolve().parents[1]


def build(tasks: int, overrides: list[str], at_once: int = 0, compute: str = "eager"):
    cfg = config.load(ROOT / "configs/strong.yaml", [f"train.meta_batch_size={tasks}", *overrides])
    torch.manual_seed(0)
    model = model_of(cfg.model, cfg.algo, (1, 28, 28), 5)
    plan = Plan.fixed(at_once, cfg.train.reduce, tasks, compute)
    return build_step(cfg, model, OneProcess(), plan, tasks), cfg


def measured_at_once(tasks: int, first_order: bool) -> tuple[int, dict]:
    """What `auto` measures here for fast mode (not cached: this bench's own measurement)."""
    step, _ = build(tasks, [f"algo.first_order={first_order}", "train.reduce=fast"])
    sizes = [c for c in plan_mod.SIZES if c <= tasks]
    run = runner(step.trainable, batch, max(sizes), torch.device("cpu"))
    rec = plan_mod.pick(run, sizes)
    return rec["at_once"], rec["tasks_per_s"]


def variants(tasks: int, fo: bool, at_once: int) -> dict:
    """name -> a MetaStep: fast mode at all tasks at once, at auto's size and one at a time;
    exact mode's fixed groups (for 1/2/4 processes: B/4 tasks a group, and one at a time); the
    compiled step."""
    steps = {}
    fo_ = f"algo.first_order={fo}"
    runs = [("fast: all at once", "fast", 0), ("fast: one at a time", "fast", 1)]
    if at_once:
        runs.insert(1, (f"fast: {at_once} at once (auto)", "fast", at_once))
    runs += [(f"exact: groups of {tasks // 4}", "exact", tasks // 4)]
    runs += [("exact: one at a time", "exact", 1)]
    for name, reduce, size in runs:
        steps[name] = build(tasks, [fo_, f"train.reduce={reduce}"], size)[0]
    for reduce, size in (("fast", at_once or 8), ("exact", tasks // 4)):
        s, _ = build(tasks, [fo_, f"train.reduce={reduce}", "algo.compile=on"], size, "compiled")
        steps[f"{reduce}: compiled, {size} at once"] = s
    return steps


def reference(tasks: int, fo: bool):
    """The exercise's meta-step with its Adam step (a fixed inner lr: no learned rates)."""
    _, cfg = build(tasks, ["algo.learn_inner_lr=none"])
    return with_adam(cfg, fo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--first-order", action="store_true")
    args = ap.parse_args()
    tasks, fo = args.meta_batch, args.first_order
    at_once, speed = measured_at_once(tasks, fo)
    print(machine_line(torch.device("cpu")))
    print(
        f"strong.yaml, meta-batch {tasks}, {'first' if fo else 'second'} order; "
        "auto's measurement: "
        + ", ".join(f"{k} {v:.1f}" for k, v in speed.items())
        + f" tasks/s -> {f'batched, {at_once} at once' if at_once else 'its pick'}",
        flush=True,
    )
    runs = {"exercise's loop": reference(tasks, fo)}
    for name, s in variants(tasks, fo, at_once).items():
        runs[name] = lambda b, s=s: s(0, b, lambda: torch.zeros(3))
    b = batch(tasks)
    samples = {k: [] for k in runs}
    for r in range(args.rounds + 1):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn(b)
            if r:
                samples[name].append(tasks / (time.perf_counter() - t))
    ref = statistics.median(samples["exercise's loop"])
    print(f"median tasks/s over {args.rounds} interleaved rounds (ratio to the exercise's loop):")
    for name, v in samples.items():
        m = statistics.median(v)
        print(
            f"  {name:<40} {m:7.1f}  {m / ref:.2f}x  "
            f"(min {min(v) / ref:.2f}, max {max(v) / ref:.2f})"
        )


if __name__ == "__main__":
    main()
