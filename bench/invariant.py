"""Can exact mode compute a rank's whole share at once? (make bench-invariant)

Exact mode fixes groups of tasks (train.reduce=exact) because a task's bits depend on how many
tasks its kernels compute together: the tasks-at-once forward folds T tasks into the channels of
one grouped convolution (metadist.models.common.task_conv), and oneDNN picks its blocking from
the whole call. This bench measures the alternative the reproducibility notes leave open: each
task's convolutions as GEMMs whose shape is the task's own (im2col, then one batched matmul,
torch.bmm, over the tasks), BatchNorm's statistics a row reduction of the task's own tensor.

For the strong.yaml shape (Conv4, 5-way 1-shot, 1 query a class, second-order MAML, one inner
step), on this CPU and its kernels (run it again under `ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2` for an AVX2 machine's):

1. **Batch invariance**: each task's meta-gradient (its own leaf copy of the weights, so nothing
   is summed across tasks) computed in groups of 1, 2, 4 and 8 tasks, compared bit for bit with
   the same task alone; for the folded (grouped-convolution) forward metadist trains with, and
   for the GEMM forward.
2. **Speed**: tasks/s of a group's second-order meta-gradient at each group size, both forwards,
   best of interleaved rounds.

Exact mode at no cost needs a forward that is batch-invariant *and*, at a rank's whole share,
at least as fast as the folded forward in the groups exact mode uses today.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metadist import config, machine
from metadist.algorithms import model_of
from metadist.data.synthetic import random_batch
from metadist.models.common import EPS


def gemm_features(model, params, x):
    """Conv4's tasks_features with each task's convolution as its own GEMM: x (T, n, C, H, W) ->
    (T, n, features); the same maths as the folded forward (conv, BatchNorm on the task's batch
    statistics, 2x2 max-pool, ReLU)."""
    T, n = x.shape[:2]
    h = x
    for i in range(model.depth):
        w = params[f"blocks.{i}.conv.weight"]  # (T, O, C, 3, 3)
        C, H, W = h.shape[2:]
        cols = F.unfold(h.reshape(T * n, C, H, W), 3, padding=1)  # (T*n, C*9, H*W)
        cols = cols.view(T, n, C * 9, H * W).transpose(1, 2).reshape(T, C * 9, n * H * W)
        y = torch.bmm(w.reshape(T, w.shape[1], -1), cols)  # (T, O, n*H*W)
        var, mean = torch.var_mean(y, dim=2, correction=0, keepdim=True)
        g = params[f"blocks.{i}.norm.weight"].unsqueeze(2)
        b = params[f"blocks.{i}.norm.bias"].unsqueeze(2)
        scale = g * torch.rsqrt(var + EPS)
        y = torch.addcmul(b - mean * scale, y, scale)
        out = y.shape[1]
        y = y.view(T, out, n, H, W).transpose(1, 2).reshape(T * n, out, H, W)
        h = F.relu(F.max_pool2d(y, 2)).view(T, n, out, H // 2, W // 2)
    return h.reshape(T, n, -1)


def forward(model, params, x, how: str):
    if how == "folded":
        return model.tasks_forward(params, x)
    h = gemm_features(model, params, x)
    # the head's rows padded to 16 (64 bytes): a task's (n, ways) logits start 64-byte aligned
    # in the group's buffer as alone (a small GEMM's bits depend on its output's alignment)
    ways = params["head.weight"].shape[1]
    w = F.pad(params["head.weight"], (0, 0, 0, -ways % 16))
    b = F.pad(params["head.bias"], (0, -ways % 16))
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))[..., :ways]


def task_loss(logits, y):
    T, n, ways = logits.shape
    return F.cross_entropy(logits.reshape(T * n, ways), y.reshape(-1), reduction="none").view(T, n)


def meta_grads(model, batch, how: str, lr: float = 0.4) -> list[torch.Tensor]:
    """Each task's second-order meta-gradient (one inner step), (T, *shape) per parameter: the
    weights are copied per task as leaves, so no gradient is summed across tasks."""
    T = batch["x_support"].shape[0]
    names = [k for k, _ in model.named_parameters() if not k.startswith("inner_lr")]
    base = dict(model.named_parameters())
    leaves = [base[k].detach().unsqueeze(0).repeat(T, *[1] * base[k].dim()) for k in names]
    for v in leaves:
        v.requires_grad_(True)
    p = dict(zip(names, leaves))
    inner = task_loss(forward(model, p, batch["x_support"], how), batch["y_support"]).mean(1)
    grads = torch.autograd.grad(inner.sum(), leaves, create_graph=True)
    fast = {k: v - lr * g for k, v, g in zip(names, leaves, grads)}
    outer = task_loss(forward(model, fast, batch["x_query"], how), batch["y_query"]).mean(1)
    return list(torch.autograd.grad(outer.sum(), leaves))


def part(batch, lo, hi):
    return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}


def grouped(model, batch, how: str, g: int) -> list[list[torch.Tensor]]:
    """Each task's meta-gradient (a list over parameters, each (1, *shape)), the tasks computed
    in consecutive groups of g."""
    T = batch["x_support"].shape[0]
    out = []
    for lo in range(0, T, g):
        grads = meta_grads(model, part(batch, lo, lo + g), how)
        out += [[v[t : t + 1] for v in grads] for t in range(min(g, T - lo))]
    return out


def invariance(model, batch, how: str, sizes) -> dict:
    """For each group size g: whether every task's meta-gradient, computed in groups of g, equals
    (bit for bit) the one computed alone, and the one computed in groups of 2 (with 2 or more
    threads a group of one task runs its kernels multi-threaded, where a larger group runs each
    task's on one thread); and the largest difference from alone."""
    runs = {g: grouped(model, batch, how, g) for g in sorted(set(sizes) | {1, 2})}

    def same(a, b):
        return all(torch.equal(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))

    def worst(a, b):
        return max((x - y).abs().max().item() for ta, tb in zip(a, b) for x, y in zip(ta, tb))

    return {
        g: {
            "as_alone": same(runs[1], runs[g]),
            "as_pairs": same(runs[2], runs[g]),
            "max_abs_diff": worst(runs[1], runs[g]),
        }
        for g in sizes
    }


def agree(model, batch) -> float:
    """The two forwards compute the same maths: their per-task meta-gradients' largest relative
    difference on the whole batch (float32 rounding)."""
    a = meta_grads(model, batch, "folded")
    b = meta_grads(model, batch, "gemm")
    return max(((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def speeds(model, batch, sizes, rounds: int) -> dict:
    """Tasks/s of the meta-gradient in groups of g, both forwards, best of interleaved rounds."""
    T = batch["x_support"].shape[0]
    best = {(how, g): float("inf") for how in ("folded", "gemm") for g in sizes}
    for _ in range(rounds):
        for how, g in best:
            t0 = time.perf_counter()
            for lo in range(0, T, g):
                meta_grads(model, part(batch, lo, lo + g), how)
            best[how, g] = min(best[how, g], time.perf_counter() - t0)
    return {f"{how} {g}": T / s for (how, g), s in best.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8, help="tasks of the invariance check")
    ap.add_argument("--speed-tasks", type=int, default=32, help="tasks of each timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "strong.yaml")
    model = model_of(cfg.model, cfg.algo, (1, 28, 28), 5)
    sizes = [g for g in (1, 2, 4, 8, 16, 32) if g <= args.tasks]
    batch = random_batch(args.tasks, 5)
    m = machine.machine()
    print(f"CPU: {m['cpu']} ({m['cpu_id']}), kernels {m['kernels']}, oneDNN {m['onednn_isa']}")
    print(f"threads {torch.get_num_threads()}; strong.yaml's shape, second order, 1 inner step")
    diff = agree(model, batch)
    print(f"the two forwards' meta-gradients agree to {diff:.1e} (largest relative difference)")
    inv = {how: invariance(model, batch, how, sizes) for how in ("folded", "gemm")}
    print("\n| forward | group of | each task's bits as alone | as in groups of 2 | largest diff |")
    print("| --- | --- | --- | --- | --- |")
    for how, rows in inv.items():
        for g, r in rows.items():
            yes = {True: "yes", False: "no"}
            print(
                f"| {how} | {g} | {yes[r['as_alone']]} | {yes[r['as_pairs']]} | "
                f"{r['max_abs_diff']:.1e} |"
            )
    speed_sizes = [g for g in (1, 2, 4, 8, 16, 32) if g <= args.speed_tasks]
    sp = speeds(model, random_batch(args.speed_tasks, 5), speed_sizes, args.rounds)
    ref = sp[f"folded {max(speed_sizes)}"]
    print(f"\n| forward | group of | tasks/s | vs folded, {max(speed_sizes)} at once |")
    print("| --- | --- | --- | --- |")
    for k, v in sp.items():
        how, g = k.split()
        print(f"| {how} | {g} | {v:.1f} | {v / ref:.2f}x |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"agree": diff, "invariance": inv, "tasks_per_s": sp}, indent=1)
        )


if __name__ == "__main__":
    main()
