"""The recipes as shipped against the exercise's loop (make bench-recipes): strong.yaml and
boss.yaml at meta-batch 8 and 32, each a `metadist train` with no extra flag (its own steps and
time budget, so its plan is the one the recipe gets, a compiled step included where the plan finds
that it pays), timed from the command's start to step --steps (start-up, the plan's measurement
and any compile included), then stopped by SIGTERM as a preempted run is; twice: the first launch
on an empty per-machine cache and a second launch of the same shape. From the start and the
steps' own speed, the tasks/s of the recipe's whole 30-minute run. Beside each, the exercise's
per-task loop (bench/reference.py, with its Adam step) on the same model and shape, in the same
process as the figures it is compared with.

All of it on this CPU's own kernels, then again under an AVX2 machine's
(ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2; on an AVX2-only CPU the two are the same
kernels); each in a process of its own, as the caps are read when torch loads.

  python bench/recipes.py [--steps 40] [--caps native,avx2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CAPS = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"},
}
CELLS = [(r, b) for r in ("strong", "boss") for b in (8, 32)]


def loop_speed(recipe: str, tasks: int, rounds: int) -> float:
    """The exercise's loop on the recipe's model and inner loop (a fixed inner rate where the recipe
    learns its rates): median tasks/s over `rounds` meta-steps after one warm-up."""
    from bench.reference import with_adam
    from metadist import config
    from metadist.data.synthetic import random_batch

    cfg = config.load(ROOT / f"configs/{recipe}.yaml", ["algo.learn_inner_lr=none"])
    d = cfg.data
    step = with_adam(cfg)
    batch = random_batch(tasks, d.ways, d.shots, d.queries)
    speeds = []
    for r in range(rounds + 1):
        t = time.perf_counter()
        step(batch)
        if r:
            speeds.append(tasks / (time.perf_counter() - t))
    return statistics.median(speeds)


def run_speed(recipe: str, tasks: int, steps: int, shards: Path, work: Path, env: dict) -> dict:
    """One `metadist train` of the recipe: tasks/s from the command's start to the line of its last
    step in metrics.jsonl, and the plan it ran."""
    name = f"{recipe}-{tasks}-{len(list(work.glob('*')))}"
    args = [
        "--config",
        f"configs/{recipe}.yaml",
        f"train.meta_batch_size={tasks}",
        "train.checkpoint_every=100000",
        "tracking.mode=disabled",
        f"data.shards={shards}",
        f"run.root={work}",
        f"run.name={name}",
    ]
    metrics = work / name / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "metadist", "train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = None
    while proc.poll() is None and end is None:
        if metrics.exists() and any(
            json.loads(x).get("step") == steps for x in metrics.read_text().splitlines() if x
        ):
            end = time.perf_counter()
            proc.send_signal(signal.SIGTERM)  # checkpoints and exits 75, as a preempted run
        time.sleep(0.02)
    out, err = proc.communicate()
    if end is None or proc.returncode not in (0, 75):
        sys.exit(f"{recipe} at meta-batch {tasks}: metadist train failed:\n{err[-2000:]}")
    plan = json.loads((work / name / "strategy.json").read_text())
    logged = [json.loads(x) for x in metrics.read_text().splitlines() if x]
    logged = [m for m in logged if "elapsed_s" in m and m["step"] <= steps]
    a, b = logged[0], logged[-1]
    steady = (b["step"] - a["step"]) * tasks / (b["elapsed_s"] - a["elapsed_s"])
    start = end - t0 - steps * tasks / steady  # the launch's cost over its steps' own time
    return {
        "tasks_per_s": steps * tasks / (end - t0),
        "start_s": _first_step_s(out),
        "steady": steady,
        # a 30-minute run of the recipe: its start, then the steps' own speed
        "run_30min": steady * max(0.0, 1800 - start) / 1800,
        "measured": "measured now" in out,
        "plan": plan,
    }


def _first_step_s(out: str) -> float | None:
    """Seconds from launch to the first meta-step done, as the run says it."""
    for line in out.splitlines():
        if "first meta-step done" in line:
            try:
                return float(line.split("first meta-step done", 1)[1].split()[0])
            except ValueError:
                return None
    return None


def one_caps(steps: int, rounds: int, shards: Path) -> list[dict]:
    """Every cell under this process's caps (set by the parent before torch loads)."""
    import torch

    from bench.bench import machine

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, METADIST_CACHE_DIR=str(work / "cache"))
        for recipe, tasks in CELLS:
            first = run_speed(recipe, tasks, steps, shards, work, env)
            cached = first["measured"] or first["plan"].get("compute") == "compiled"
            # a second launch differs only where the first measured or compiled something
            again = run_speed(recipe, tasks, steps, shards, work, env) if cached else first
            loop = loop_speed(recipe, tasks, rounds)
            rows.append(
                {
                    "recipe": recipe,
                    "meta_batch": tasks,
                    "loop": loop,
                    "first": first,
                    "again": again,
                }
            )
            print(_row(rows[-1]), flush=True)
    return [{"machine": machine(torch.device("cpu")), "rows": rows}]


def _row(r: dict) -> str:
    loop, a, b = r["loop"], r["first"], r["again"]
    plan = b["plan"]
    how = ", ".join(str(plan.get(k, "?")) for k in ("reduce", "at_once", "compute"))
    again = f"{b['start_s'] or 0:4.1f} s" if b is not a else "(same)"
    return (
        f"  {r['recipe'] + '.yaml':<11} {r['meta_batch']:>3} | loop {loop:5.1f} | steps "
        f"{b['steady']:5.1f} ({b['steady'] / loop:.2f}x) | whole run {a['tasks_per_s']:5.1f} "
        f"({a['tasks_per_s'] / loop:.2f}x) | 30-min run {a['run_30min']:5.1f} "
        f"({a['run_30min'] / loop:.2f}x) | first step after {a['start_s'] or 0:4.1f} s, "
        f"again {again} | {how}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--caps", default="native,avx2")
    ap.add_argument("--shards", type=Path, help="prepared alphabets shards (else prepared in tmp)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child: this caps' cells
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_caps(args.steps, args.rounds, args.shards)))
        return
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    unknown = [c for c in caps if c not in CAPS]
    if unknown:
        sys.exit(f"--caps: {', '.join(unknown)} unknown; choose from {', '.join(CAPS)}")
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        shards = args.shards or Path(tmp) / "shards"
        if not args.shards:
            r = subprocess.run(
                [sys.executable, "-m", "metadist", "prepare", f"data.shards={shards}"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if r.returncode:
                sys.exit(f"metadist prepare failed:\n{r.stderr[-2000:]}")
        print(
            f"tasks/s against the exercise's loop, {time.strftime('%Y-%m-%d')}: 'steps' between "
            f"the first and the last logged step, 'whole run' from the command's start to step "
            f"{args.steps} (start-up, plan and any compile included), '30-min run' the recipe's "
            "30 minutes from that start and the steps' speed; the plan (reduce, tasks at once, "
            "compute) last",
            flush=True,
        )
        for c in caps:
            env = {k: v for k, v in os.environ.items() if k not in CAPS["avx2"]}
            env.update(CAPS[c])
            print(f"{c} kernels {CAPS[c] or '(no caps)'}:", flush=True)
            r = subprocess.run(
                [sys.executable, __file__, "--one", c, "--steps", str(args.steps)]
                + ["--rounds", str(args.rounds), "--shards", str(shards)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            if r.returncode:
                sys.exit(f"the {c} kernels' run failed")
            lines = r.stdout.splitlines()
            print("\n".join(lines[:-1]))
            print(f"  machine: {json.loads(lines[-1])[0]['machine']}", flush=True)


if __name__ == "__main__":
    main()
