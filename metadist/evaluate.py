"""Meta-test: adapt to each fixed episode without a second-order graph and report mean accuracy
+- 95% CI (1.96 * std / sqrt(n)): `evaluate()` serves validation and bench/curve.py;
`test_report()` (one split, or Meta-Dataset's table of sources) is the test of `metadist train`
and of `metadist evaluate` alike. `predict()` writes the query classes of a folder of test tasks.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import torch

from metadist.algorithms.core import Inner, adapt_and_predict, per_task_accuracy
from metadist.data.episodes import to_float
from metadist.data.sources import DataError, decode, preprocess
from metadist.errors import MetadistError
from metadist.models import Backbone


class EvalError(MetadistError):
    pass


def ci95(accs) -> tuple[float, float]:
    a = np.asarray(accs, dtype=np.float64)
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


def episode_accuracies(
    model: Backbone,
    episodes,
    inner: Inner,
    batch: int,
    device,
    strategy: str = "batched",
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
        logits = adapt_and_predict(model, params, b, inner, strategy)
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
    strategy: str = "batched",
    dist=None,
) -> dict:
    """{accuracy, ci95, episodes}: mean accuracy over the episodes after adapting with `inner`,
    `batch` episodes at a time. With `dist` (metadist.distributed.Dist) the episodes are shared
    among its ranks."""
    accs = episode_accuracies(model, episodes, inner, batch, device, strategy, dist)
    mean, ci = ci95(accs.cpu().numpy())
    return {"accuracy": mean, "ci95": ci, "episodes": len(episodes)}


def source_table(model: Backbone, splits: dict, inner: Inner, batch: int, device, **kw) -> dict:
    """Meta-Dataset's table: each source's accuracy +- 95% CI on its episodes (`splits`: name ->
    Episodes), and their mean with the CI of a mean of independent estimates
    (sqrt(sum ci^2) / sources). kw: evaluate's strategy and dist."""
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
    +- 95% CI of its one split. kw: evaluate's strategy and dist."""
    if sources:
        return source_table(model, splits, inner, batch, device, **kw)
    return evaluate(model, next(iter(splits.values())), inner, batch, device, **kw)


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


_NUM = re.compile(r"^\d+$")
_IMG = re.compile(r"^image_(\d+)\.png$")


def read_task_folder(tasks_dir: Path, prep: dict) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The exercise's layout -> [(task id, support (ways, C, H, W) uint8, query (m, C, H, W)
    uint8)], every image through the training preprocessing `prep`
    (metadist.data.prepare.preprocessing)."""
    tasks_dir = Path(tasks_dir)
    sup, qry = tasks_dir / "support", tasks_dir / "query"
    if not sup.is_dir() or not qry.is_dir():
        raise EvalError(f"{tasks_dir}: expected folders support/ and query/")
    ids = sorted((p.name for p in sup.iterdir() if p.is_dir() and _NUM.match(p.name)), key=int)
    if not ids:
        raise EvalError(f"{sup}: no task folders (NNNN)")

    def images(folder: Path) -> torch.Tensor:
        files = sorted(
            ((int(m[1]), p) for p in folder.glob("*.png") if (m := _IMG.match(p.name))),
            key=lambda t: t[0],
        )
        if not files:
            raise EvalError(f"{folder}: no image_i.png files")
        if [i for i, _ in files] != list(range(len(files))):
            raise EvalError(
                f"{folder}: images must be image_0.png .. image_{len(files) - 1}.png without gaps"
            )
        try:
            return torch.cat(
                [
                    preprocess(
                        decode(p, prep["channels"]).unsqueeze(0),
                        prep["size"],
                        prep["resize"],
                        prep["invert"],
                    )
                    for _, p in files
                ]
            )
        except DataError as e:
            raise EvalError(str(e)) from None

    out = []
    for i in ids:
        if not (qry / i).is_dir():
            raise EvalError(f"{qry / i}: missing (support/{i} has no query folder)")
        out.append((i, images(sup / i), images(qry / i)))
    return out


def predict(
    model: Backbone,
    inner: Inner,
    tasks: list,
    ways: int,
    out_csv: Path,
    device="cpu",
    batch: int = 64,
) -> int:
    """Adapt to each task's support (image i is class i; `tasks` from read_task_folder) with
    `inner` and write `id,class` rows in task order."""
    params = dict(model.named_parameters())
    rows, n = [], 0
    for s in range(0, len(tasks), batch):
        group = tasks[s : s + batch]
        for tid, sx, _ in group:
            if sx.shape[0] != ways:
                raise EvalError(
                    f"task {tid}: {sx.shape[0]} support images (ways), the model adapts to "
                    f"{ways}-way tasks"
                )
        shapes = {(sx.shape[0], qx.shape[0]) for _, sx, qx in group}
        # tasks of equal size are adapted together; others one by one
        for part in [group] if len(shapes) == 1 else [[t] for t in group]:
            xs = to_float(torch.stack([sx for _, sx, _ in part])).to(device)
            xq = to_float(torch.stack([qx for _, _, qx in part])).to(device)
            ys = torch.arange(ways, device=device).expand(len(part), -1)
            b = {"x_support": xs, "y_support": ys, "x_query": xq}
            for row in adapt_and_predict(model, params, b, inner).argmax(-1).cpu():
                for c in row.tolist():
                    rows.append((n, c))
                    n += 1
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "class"])
        w.writerows(rows)
    return len(tasks)
