"""`make bench-scaling`: does data-parallel MAML scale? Measured on the device at hand and modelled
for 1/2/4/8 devices.

1. The meta-step time (second order, 1 inner step, 1-shot 1-query) against tasks per rank,
   1, 2, 4, ..., 64, for 5-way and 20-way, with the strategy training would use there.
2. The all-reduce time of the flat meta-gradient (the model's parameters and learned rates,
float32):
   measured between 2 processes on this machine (gloo on CPU, NCCL where there are 2+ GPUs);
   for G devices it is modelled as a ring all-reduce, 2(G-1)/G * bytes / bandwidth + 2(G-1) *
   latency, with a stated link bandwidth and latency (--link-gbps, --link-us), said so in the table.
3. Predicted tasks/s and efficiency for G = 1, 2, 4, 8: strong scaling (global meta-batch fixed,
each
   rank B/G tasks) and weak scaling (B tasks per rank): step(G) = meta_step(tasks per rank) +
   allreduce(G).
A table, bench/results/scaling.json and a plot (bench/results/scaling.png).

  python bench/scaling.py [--device cuda] [--batch 32] [--link-gbps 100] [--link-us 10] [--max-tasks
  64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench import machine, make_batch, sync  # noqa: E402
from bench.bench_dist import free_port  # noqa: E402
from metadist.algorithms import maml  # noqa: E402
from metadist.algorithms.core import Inner  # noqa: E402
from metadist.models import InnerRates  # noqa: E402
from metadist.models.conv4 import ConvNet  # noqa: E402
from metadist.step.compute import Eager, meta_backward  # noqa: E402


def step_time(model, ways: int, tasks: int, device, strategy: str, rounds: int) -> float:
    batch = make_batch(ways, tasks, device)
    inner = Inner(1, 0.4 if ways == 5 else 0.1, False)
    params = dict(model.named_parameters())

    def run():
        meta_backward(
            lambda f, p, c: maml.task_losses(f, p, c, inner),
            Eager(model, True, 1 if strategy == "loop" else 0),
            params,
            batch,
            1.0 / tasks,
        )
        model.zero_grad(set_to_none=True)

    run()
    times = []
    for _ in range(rounds):
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _allreduce_worker(rank, world, port, numel, device_type, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device_type == "cuda" else "gloo"
    tdist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    flat = torch.randn(numel, device=device)
    times = []
    for i in range(30):
        tdist.barrier()
        sync(device)
        t = time.perf_counter()
        tdist.all_reduce(flat)
        sync(device)
        if i >= 5:
            times.append(time.perf_counter() - t)
    if rank == 0:
        out.put(statistics.median(times))
    tdist.destroy_process_group()


def measured_allreduce(numel: int, device) -> tuple[float, str]:
    """Seconds for one all-reduce of `numel` float32 between 2 processes (2 GPUs, or gloo on
    CPU)."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return float("nan"), "one GPU: not measured"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_allreduce_worker, args=(r, 2, port, numel, device.type, out))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    t = out.get(timeout=300)
    for p in procs:
        p.join()
    return t, ("2 GPUs, NCCL" if device.type == "cuda" else "2 processes on this CPU, gloo")


def ring(bytes_: int, g: int, gbps: float, us: float) -> float:
    return 0.0 if g == 1 else 2 * (g - 1) / g * bytes_ / (gbps * 1e9) + 2 * (g - 1) * us * 1e-6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--batch",
        type=int,
        default=32,
        help="global meta-batch (strong) / per-rank meta-batch (weak)",
    )
    ap.add_argument(
        "--link-gbps", type=float, default=100.0, help="modelled all-reduce bus bandwidth, GB/s"
    )
    ap.add_argument(
        "--link-us", type=float, default=10.0, help="modelled latency per ring hop, microseconds"
    )
    ap.add_argument("--max-tasks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    sizes = [1 << i for i in range(a.max_tasks.bit_length()) if 1 << i <= a.max_tasks]
    print(f"machine: {machine(device)}; second-order MAML, 1 inner step, 1-shot 1-query")
    result = {
        "machine": machine(device),
        "link_gbps": a.link_gbps,
        "link_us": a.link_us,
        "ways": {},
    }
    for ways in (5, 20):
        torch.manual_seed(0)
        model = ConvNet(ways, rates=InnerRates("layer")).to(device)
        numel = sum(p.numel() for p in model.parameters())
        strategies = ("batched",) if device.type == "cuda" else ("batched", "loop")
        times = {}
        print(
            f"\n{ways}-way: meta-step time against tasks per rank ({'/'.join(strategies)}, the "
            "faster counts)"
        )
        print(f"{'tasks/rank':>10} {'step ms':>9} {'tasks/s':>9} {'strategy':>9}")
        for n in sizes:
            ts = {s: step_time(model, ways, n, device, s, a.rounds) for s in strategies}
            best = min(ts, key=ts.get)
            times[n] = ts[best]
            print(f"{n:>10} {1000 * ts[best]:>9.1f} {n / ts[best]:>9.1f} {best:>9}", flush=True)
        ar, how = measured_allreduce(numel, device)
        print(
            f"all-reduce of the flat meta-gradient ({numel:,} floats, {4 * numel / 1e6:.2f} MB): "
            f"{'%.2f ms' % (1000 * ar) if ar == ar else 'n/a'} measured ({how}); G devices: "
            "modelled ring at "
            f"{a.link_gbps:g} GB/s, {a.link_us:g} us per hop"
        )
        rows = []
        for g in (1, 2, 4, 8):
            t_ar = ring(4 * numel, g, a.link_gbps, a.link_us)
            for regime, per_rank in (("strong", a.batch // g), ("weak", a.batch)):
                if per_rank < 1 or per_rank not in times:
                    continue
                step = times[per_rank] + t_ar
                tps = per_rank * g / step
                rows.append(
                    {
                        "gpus": g,
                        "regime": regime,
                        "tasks_per_rank": per_rank,
                        "step_ms": 1000 * step,
                        "allreduce_ms": 1000 * t_ar,
                        "tasks_per_s": tps,
                        "efficiency": tps / (g * (a.batch / (times[a.batch])))
                        if a.batch in times
                        else float("nan"),
                    }
                )
        print(
            f"{'devices':>7} {'regime':>7} {'tasks/rank':>10} {'step ms':>9} {'all-reduce ms':>14} "
            f"{'tasks/s':>9} {'efficiency':>10}"
        )
        for r in rows:
            print(
                f"{r['gpus']:>7} {r['regime']:>7} {r['tasks_per_rank']:>10} {r['step_ms']:>9.1f} "
                f"{r['allreduce_ms']:>14.3f} "
                f"{r['tasks_per_s']:>9.1f} {r['efficiency']:>10.0%}"
            )
        result["ways"][ways] = {
            "params": numel,
            "step_s": times,
            "allreduce_measured_s": ar,
            "allreduce_how": how,
            "rows": rows,
        }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(a.out).with_suffix(".png"))
    print(f"\nwritten to {a.out} and {Path(a.out).with_suffix('.png')}")


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ways, r in result["ways"].items():
        n = sorted(int(k) for k in r["step_s"])
        axes[0].plot(n, [k / r["step_s"][k] for k in n], "o-", label=f"{ways}-way")
        for regime, style in (("strong", "s--"), ("weak", "o-")):
            rows = [x for x in r["rows"] if x["regime"] == regime]
            axes[1].plot(
                [x["gpus"] for x in rows],
                [x["efficiency"] for x in rows],
                style,
                label=f"{ways}-way {regime}",
            )
    axes[0].set(
        xscale="log",
        xlabel="tasks per rank",
        ylabel="tasks/s of one device",
        title="meta-step throughput",
    )
    axes[1].set(
        xlabel="devices", ylabel="predicted efficiency", ylim=(0, 1.1), title="predicted scaling"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(result["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
