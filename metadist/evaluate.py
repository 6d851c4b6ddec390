"""Meta-test: adapt to each fixed episode without a second-order graph and report mean accuracy
+- 95% CI (1.96 * std / sqrt(n)): `evaluate()` serves validation and bench/curve.py;
`test_report()` (one split, or Meta-Dataset's table of sources) is the test of `metadist train`
and of `metadist evaluate` alike. (A folder of tasks is predicted through the Python API:
metadist.api.predict_folder.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from metadist.algorithms.core import Inner, adapt_and_predict, per_task_accuracy
from metadist.models import Backbone


def ci95(accs) -> tuple[float, float]:
    a = np.asarray(accs, dtype=np.float64)
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


def episode_accuracies(
    model: Backbone,
    episodes,
    inner: Inner,
    batch: int,
    device,
    one_at_a_time: bool = False,
    dist=None,
) -> torch.Tensor:
    """Accuracy of each episode of `episodes` (a split's Episodes, fixed or variable, gathered on
    demand a batch at a time: Episodes.batch), adapting with `inner`.
    The episodes are cut into fixed batches of `batch` by their index, whatever the world size, and
    rank r of `dist` adapts batches r, r+W, ...: every episode is computed in the same batch at any
    world size, so the accuracies are too; the batches are then gathered in order."""
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    params = dict(model.named_parameters())
    rows = []
    for s in range(rank * batch, len(episodes), world * batch):
        b = {k: v.to(device) for k, v in episodes.batch(s, s + batch).items()}
        logits = adapt_and_predict(model, params, b, inner, one_at_a_time)
        acc = per_task_accuracy(logits, b["y_query"], b.get("ways"))
        rows.append(torch.cat([acc, acc.new_zeros(batch - len(acc))]))
    mine = torch.stack(rows) if rows else torch.zeros(0, batch, device=device)
    batches = dist.gather_rows(mine, -(-len(episodes) // batch)) if dist else mine
    return batches.reshape(-1)[: len(episodes)]


def evaluate(
    model: Backbone,
    episodes,
    inner: Inner,
    batch: int,
    device,
    one_at_a_time: bool = False,
    dist=None,
) -> dict:
    """{accuracy, ci95, episodes}: mean accuracy over the episodes after adapting with `inner`,
    `batch` episodes at a time. With `dist` (metadist.distributed.Dist) the episodes are shared
    among its ranks."""
    accs = episode_accuracies(model, episodes, inner, batch, device, one_at_a_time, dist)
    mean, ci = ci95(accs.cpu().numpy())
    return {"accuracy": mean, "ci95": ci, "episodes": len(episodes)}


def source_table(model: Backbone, splits: dict, inner: Inner, batch: int, device, **kw) -> dict:
    """Meta-Dataset's table: each source's accuracy +- 95% CI on its episodes (`splits`: name ->
    Episodes), and their mean with the CI of a mean of independent estimates
    (sqrt(sum ci^2) / sources). kw: evaluate's one_at_a_time and dist."""
    rows = {name: evaluate(model, eps, inner, batch, device, **kw) for name, eps in splits.items()}
    cis = np.array([r["ci95"] for r in rows.values()])
    return {
        "sources": rows,
        "accuracy": float(np.mean([r["accuracy"] for r in rows.values()])),
        "ci95": float(np.sqrt((cis**2).sum()) / len(cis)),
        "episodes": sum(r["episodes"] for r in rows.values()),
    }


def test_report(model: Backbone, splits: dict, sources: bool, inner: Inner, batch, device, **kw):
    """The test report of `metadist train` and `metadist evaluate`: with `sources` (a run over
    Meta-Dataset's sources) the source table of `splits` (name -> Episodes), else the accuracy
    +- 95% CI of its one split. kw: evaluate's one_at_a_time and dist."""
    if sources:
        return source_table(model, splits, inner, batch, device, **kw)
    return evaluate(model, next(iter(splits.values())), inner, batch, device, **kw)


class Evaluation:
    """A training run's validation and test, on its sources' fixed episodes: `inner_of(steps)` is
    the inner loop evaluation adapts with (None: eval.inner_steps); `e` the eval section;
    `one_at_a_time` as the run's step computes its tasks; the episodes shared among `dist`'s
    ranks."""

    def __init__(self, model, inner_of, sources, e, one_at_a_time: bool, dist):
        self.model, self.inner_of, self.sources, self.e = model, inner_of, sources, e
        self.kw = {"one_at_a_time": one_at_a_time}
        self.dist, self.device = dist, dist.device
        self.val_sets = sources.episodes("val")

    @property
    def val_episodes(self) -> int:
        return sum(len(v) for v in self.val_sets.values())

    def accuracy(self, episodes, steps: int, dist=None) -> float:
        inner, batch = self.inner_of(steps), self.e.tasks_per_batch
        return evaluate(self.model, episodes, inner, batch, self.device, dist=dist, **self.kw)[
            "accuracy"
        ]

    def validate(self) -> dict:
        """The val accuracy on the fixed val episodes (many sources: the mean of theirs, each
        one's as val_accuracy/<source> too)."""
        steps = self.e.val_inner_steps
        accs = {n: self.accuracy(eps, steps, self.dist) for n, eps in self.val_sets.items()}
        out = {"val_accuracy": sum(accs.values()) / len(accs)}
        if self.sources.many:
            out.update({f"val_accuracy/{name}": a for name, a in accs.items()})
        return out

    def some(self) -> int:
        """One validation on a few val episodes, on this rank alone (the budget schedule times
        it)."""
        some = next(iter(self.val_sets.values())).first(2 * self.e.tasks_per_batch)
        self.accuracy(some, self.e.val_inner_steps)
        return len(some)

    def test(self) -> dict:
        """The test report (per source with many), with the inner steps taken."""
        inner, sources = self.inner_of(None), self.sources
        tests = sources.episodes("test", sources.test_limit(self.e))
        kw = dict(self.kw, dist=self.dist)
        r = test_report(
            self.model, tests, sources.many, inner, self.e.tasks_per_batch, self.device, **kw
        )
        r["inner_steps"] = inner.steps  # taken (protonet: 0 unless eval.finetune)
        return r


def format_table(table: dict, title: str = "source") -> str:
    """source_table's rows, one a line: accuracy in percent +- the 95% CI, the episode count."""
    width = max(len(title), *(len(n) for n in table["sources"]), len("mean"))
    lines = [f"{title:<{width}}  accuracy (%)     episodes"]
    for name, r in [*table["sources"].items(), ("mean", table)]:
        lines.append(
            f"{name:<{width}}  {100 * r['accuracy']:6.2f} +- {100 * r['ci95']:5.2f}  "
            f"{r['episodes']:8d}"
        )
    return "\n".join(lines)
