"""`make bench`: meta-training speed of every strategy against the exercise's per-task loop,
measured interleaved in one process on the same data; memory; and the data reader's speed.

Prints tables (each with a machine line) and writes them as JSON to bench/results/latest.json.
Figures are ratios against the baseline measured in the same run. CPU memory is the bytes the
autograd graph holds at the end of a meta-step's forward (saved tensors), the part that grows
with inner steps and tasks; on CUDA it is the allocator's peak.

  python bench/bench.py [--only meta|memory|data] [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reference import meta_step as reference_step
from metadist.algorithms import maml
from metadist.algorithms.core import Inner
from metadist.data.synthetic import random_batch
from metadist.machine import cpu_facts
from metadist.models.conv4 import ConvNet
from metadist.step.compute import Eager, Graphed, meta_backward
from metadist.step.plan import SIZES

# metadist's selectable strategies; "batched" is the default
STRATEGIES = ("batched", "loop")


def strategies(device) -> tuple[str, ...]:
    return STRATEGIES + (("graph",) if device.type == "cuda" else ())


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    c = cpu_facts()
    return (
        f"{c['name']} ({c['vendor']} family {c['family']} model {c['model']}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )


def cpu_peak(threads: int) -> tuple[float, str]:
    """The float32 ceiling of `threads` cores in GFLOP/s, and how it was counted: vector lanes
    (AVX-512: 16, AVX/AVX2: 8, else 4) x 2 (an FMA is two FLOPs) x 2 FMA units per core (what
    current server cores have: Xeon Sapphire Rapids, EPYC Zen 4/5; an assumption, not read from
    the CPU) x the clock /proc/cpuinfo reports (on a VM often the base clock, not the boost)."""
    c = cpu_facts()
    flags = set(c["vector_flags"])
    lanes = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
    ghz = c["mhz"] / 1000
    peak = threads * lanes * 2 * 2 * ghz
    how = f"{threads} cores x {lanes} float32 lanes x 2 (FMA) x 2 FMA units x {ghz:.2f} GHz"
    return peak, how


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's float32 peak as measured, GFLOP/s: the best of `repeats` n x n x n products
    (torch.mm, this process's threads) after one warm-up; what a large GEMM reaches, the fairest
    ceiling for a model's rows (a formula's clock and FMA units may not be what the CPU runs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_task(model, batch, inner: Inner) -> float:
    """FLOPs of one task of the reference loop's meta-step (forward, inner gradients and the
    meta-backward through them), as torch.utils.flop_counter counts them (convolutions and matrix
    products; element-wise work such as BatchNorm and ReLU is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        reference_step(model, one, inner.steps, inner.lr, inner.first_order)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def make_batch(ways, tasks, device, shots=1, queries=1, seed=0):
    b = random_batch(tasks, ways, shots, queries, seed=seed)
    return {k: v.to(device) for k, v in b.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runner(name, model, batch, inner: Inner, chunk=0):
    params = dict(model.named_parameters())
    tasks = batch["x_support"].shape[0]
    if name == "reference":
        return lambda: reference_step(model, batch, inner.steps, inner.lr, inner.first_order)
    fn = lambda f, p, c: maml.task_losses(f, p, c, inner)
    # the loop: one task at a time
    compute = Eager(model, not inner.first_order, 1 if name == "loop" else chunk)
    if name == "graph":  # tasks at once captured as one CUDA graph (algo.compile on a GPU)
        step = Graphed(
            lambda b: meta_backward(fn, compute, params, b, 1.0 / tasks),
            list(params.values()),
            batch,
        )
        model.zero_grad(set_to_none=True)
        return lambda: step(batch)
    return lambda: meta_backward(fn, compute, params, batch, 1.0 / tasks)


def grads_of(model, run):
    model.zero_grad(set_to_none=True)
    run()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def equivalence(model, batch, inner: Inner, tasks: int = 4) -> dict:
    """Max relative difference of each strategy's meta-gradient from the reference loop's, in
    float64 on the first `tasks` tasks (float32 through several inner steps at a large inner lr
    amplifies rounding, which would hide a real error or fake one)."""
    m64 = copy.deepcopy(model).double()
    b64 = {
        k: (v[:tasks].double() if v.is_floating_point() else v[:tasks]) for k, v in batch.items()
    }
    ref = grads_of(m64, runner("reference", m64, b64, inner))
    return {
        s: ((grads_of(m64, runner(s, m64, b64, inner)) - ref).abs().max() / ref.abs().max()).item()
        for s in strategies(batch["x_support"].device)
    }


def time_interleaved(model, runs: dict, tasks: int, device, rounds: int) -> dict:
    """tasks/s per runner: every round runs each once, in turn; the median round counts."""
    samples = {k: [] for k in runs}
    for run in runs.values():  # warm-up (allocator, oneDNN primitive caches)
        run()
        model.zero_grad(set_to_none=True)
    for _ in range(rounds):
        for k, run in runs.items():
            sync(device)
            t = time.perf_counter()
            run()
            sync(device)
            samples[k].append(tasks / (time.perf_counter() - t))
            model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in samples.items()}


def graph_bytes(run, device, dedup: bool = False) -> int:
    """Peak memory of one meta-step: CUDA allocator peak, or on CPU the largest total of tensors
    saved for backward (what a second-order graph holds), tracked through pack/unpack hooks; with
    `dedup` a storage saved by several operations counts once."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        run()
        return torch.cuda.max_memory_allocated(device)
    live, peak, refs = [0], [0], {}

    class Saved:
        def __init__(self, t):
            self.t, self.n = t, t.untyped_storage().nbytes()
            self.key = (t.untyped_storage().data_ptr(), self.n) if dedup else id(self)
            refs[self.key] = refs.get(self.key, 0) + 1
            if refs[self.key] == 1:
                live[0] += self.n
                peak[0] = max(peak[0], live[0])

        def __del__(self):
            refs[self.key] -= 1
            if refs[self.key] == 0:
                del refs[self.key]
                live[0] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        run()
    return peak[0]


def bench_meta(device, quick: bool) -> list[dict]:
    rows = []
    settings = [(5, 32), (20, 16)]
    steps_list = [1] if quick else [1, 5]
    for ways, tasks in settings:
        torch.manual_seed(0)
        model = ConvNet(ways).to(device)
        batch = make_batch(ways, tasks, device)
        for first_order in (False, True):
            for steps in steps_list:
                inner = Inner(steps, 0.4 if ways == 5 else 0.1, first_order)
                runs = {"reference": runner("reference", model, batch, inner)}
                runs.update({s: runner(s, model, batch, inner) for s in strategies(device)})
                err = equivalence(model, batch, inner)
                # on a CPU, algo.strategy=auto also measures the tasks the batched strategy
                # computes at once (metadist.step.plan.SIZES; 1 is the loop): the same maths
                sizes = [c for c in SIZES if 1 < c < tasks] if device.type == "cpu" else []
                for c in sizes:
                    runs[f"batched/{c}"] = runner("batched", model, batch, inner, chunk=c)
                    err[f"batched/{c}"] = err["batched"]
                flops = flops_per_task(model, batch, inner)
                tps = time_interleaved(model, runs, tasks, device, rounds=2)
                mem = {k: graph_bytes(run, device) for k, run in runs.items()}
                model.zero_grad(set_to_none=True)
                # auto: on a GPU batched; on a CPU the fastest of the loop and the batched
                # strategy at each size, as the run's start-up measurement picks
                pick = (
                    "batched"
                    if device.type == "cuda"
                    else max(["batched", "loop", *[f"batched/{c}" for c in sizes]], key=tps.get)
                )
                tps["auto"], mem["auto"], err["auto"] = tps[pick], mem[pick], err[pick]
                for k in list(runs) + ["auto"]:
                    rows.append(
                        {
                            "ways": ways,
                            "meta_batch": tasks,
                            "order": 1 if first_order else 2,
                            "inner_steps": steps,
                            "strategy": k if k != "auto" else f"auto={pick}",
                            "tasks_per_s": tps[k],
                            "ratio": tps[k] / tps["reference"],
                            "gflop_per_task": flops / 1e9,
                            "gflop_per_s": flops * tps[k] / 1e9,
                            "mem_mb": mem[k] / 2**20,
                            "max_rel_grad_err": err.get(k, 0.0),
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{ways:>4} {tasks:>5} {r['order']:>5} {steps:>5}  {r['strategy']:<18} "
                        f"{r['tasks_per_s']:>8.1f} "
                        f"{r['ratio']:>6.2f}x {r['gflop_per_task']:>7.3f} {r['gflop_per_s']:>7.1f} "
                        f"{r['mem_mb']:>9.1f} {r['max_rel_grad_err']:>14.1e}",
                        flush=True,
                    )
    return rows


def bench_memory(device, quick: bool) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    model = ConvNet(5).to(device)
    batch = make_batch(5, 32, device)
    for steps in [1, 5] if quick else [1, 5, 10]:
        for label, chunk, ckpt in (
            ("whole batch", 0, False),
            ("tasks_per_chunk=8", 8, False),
            ("checkpoint_inner", 0, True),
            ("chunk 8 + checkpoint", 8, True),
        ):
            run = runner("batched", model, batch, Inner(steps, 0.4, False, checkpoint=ckpt), chunk)
            mb = graph_bytes(run, device) / 2**20
            model.zero_grad(set_to_none=True)
            tps = float("nan")
            if steps < 10:  # one timed run; the 10-step rows report memory only
                t = time.perf_counter()
                run()
                sync(device)
                tps = 32 / (time.perf_counter() - t)
                model.zero_grad(set_to_none=True)
            rows.append({"inner_steps": steps, "variant": label, "mem_mb": mb, "tasks_per_s": tps})
            print(f"{steps:>5}  {label:<22} {mb:>9.1f} {tps:>8.1f}", flush=True)
    return rows


def bench_data(quick: bool) -> list[dict]:
    """Reader episodes/s on a synthetic split written by the real writer, 0/1/2 workers."""
    import tempfile

    import numpy as np

    from metadist.data.device import meta_batches
    from metadist.data.format import write_split
    from metadist.data.order import StreamSpec
    from metadist.data.sources import ClassSet

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        classes = ClassSet(
            names=[f"A/character{i:02d}" for i in range(100)],
            images=list(rng.integers(0, 256, size=(100, 20, 1, 28, 28), dtype=np.uint8)),
            splits={"train": list(range(100))},
            rotations={"train": (0,)},
        )
        spec = {
            "format": 2,
            "split": "train",
            "ways": 5,
            "shots": 1,
            "queries": 1,
            "episodes": 4000,
            "episodes_per_shard": 1000,
            "seed": 0,
        }
        write_split(Path(tmp), "train", classes, spec, log=lambda *a: None)
        steps = 40 if quick else 120
        for workers in (0, 1, 2):
            it = meta_batches(
                Path(tmp) / "train",
                StreamSpec(0, 32, 0, 1, 0, steps, task_aug=0.4, num_workers=workers),
            )
            t = time.perf_counter()
            n = sum(b["x_support"].shape[0] for b in it)
            eps = n / (time.perf_counter() - t)
            rows.append({"workers": workers, "episodes_per_s": eps})
            print(f"{workers:>8} {eps:>12.0f}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("meta", "memory", "data"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "latest.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    out = {
        "machine": machine(device),
        "device": device.type,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"machine: {out['machine']}")
    if args.only in (None, "meta"):
        print(
            "\nmeta-training tasks/s (interleaved, same data; ratio = against the exercise's "
            "per-task loop)"
        )
        print(
            f"{'ways':>4} {'batch':>5} {'order':>5} {'steps':>5}  {'strategy':<18} {'tasks/s':>8} "
            f"{'ratio':>7} {'GFLOP':>7} {'GFLOP/s':>7} "
            f"{'mem MB':>9} {'grad err (f64)':>14}"
        )
        out["meta"] = bench_meta(device, args.quick)
        if device.type == "cpu":
            peak, how = cpu_peak(torch.get_num_threads())
            gemm = gemm_peak()
            best = max(r["gflop_per_s"] for r in out["meta"])
            out["cpu_peak_gflop_per_s"] = peak
            out["gemm_peak_gflop_per_s"] = gemm
            print(
                f"GFLOP: per task of the reference loop (torch.utils.flop_counter: convolutions "
                f"and matrix products); GFLOP/s: that work over each row's time. This CPU's "
                f"float32 peak measured in this run (2048 x 2048 x 2048 torch.mm, best of 5): "
                f"{gemm:.1f} GFLOP/s; the formula's ceiling: {peak:.0f} GFLOP/s ({how}). The "
                f"best row reaches {best:.1f} GFLOP/s: {100 * best / gemm:.1f}% of the measured "
                f"peak, {100 * best / peak:.1f}% of the formula's."
            )
    if args.only in (None, "memory"):
        print(
            "\nsecond-order memory against inner steps (5-way 1-shot, 32 tasks, batched) "
            f"[{out['machine']}]"
        )
        print(f"{'steps':>5}  {'variant':<22} {'mem MB':>9} {'tasks/s':>8}")
        out["memory"] = bench_memory(device, args.quick)
    if args.only in (None, "data"):
        print(
            "\ndata reader (5-way 1-shot episodes, meta-batch 32, task augmentation on) "
            f"[{out['machine']}]"
        )
        print(f"{'workers':>8} {'episodes/s':>12}")
        out["data"] = bench_data(args.quick)
        if "meta" in out:
            need = max(r["tasks_per_s"] for r in out["meta"] if r["strategy"] == "batched")
            have = min(r["episodes_per_s"] for r in out["data"])
            print(
                f"fastest meta-step consumes {need:.0f} episodes/s; the slowest reader setting "
                f"delivers {have:.0f} "
                f"({have / need:.0f}x headroom)"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
