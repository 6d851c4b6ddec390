"""The Python interface to a trained learner: load it, adapt it to a task, predict.

    import metadist
    learner = metadist.load("runs/boss")              # a run folder, or a weights file
    task = learner.adapt(support, labels)             # five labelled images of new classes
    task.predict(query)                               # their classes, (n,) int64

Images are file paths, PIL images, uint8 arrays or tensors (H, W), (H, W, C) or (C, H, W), float
ones in [0, 1], or a batch of them ((n, ...) or a list), of any size: the run's own preprocessing
(its manifest's channels, size, resize and invert, as `prepare` and `predict` apply) turns them
into what the model sees (`learner.preprocess`). Each algorithm adapts its own way, at the run's
test settings (`eval.inner_steps`): MAML and first-order MAML take their inner steps, ANIL its head,
ProtoNets and pre-training their prototypes. As at test, BatchNorm normalises with the statistics
of the images given together (MAML's transductive setting): give a task's query images in one
call, as `metadist predict` does. Bad input raises `APIError`, one line naming it.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch

from metadist.algorithms import eval_inner, get
from metadist.algorithms.core import adapt_task
from metadist.checkpoint import load_model
from metadist.config import override
from metadist.data.images import SUFFIXES, ImageError, Images
from metadist.data.prepare import preprocessing
from metadist.errors import MetadistError


class APIError(MetadistError, ValueError):
    """Input the learner cannot take: the message names it and what to do."""


def load(path, device=None, overrides=()) -> Learner:
    """The learner a run folder (its best weights, else its final ones) or a weights file holds;
    `overrides` as on the command line (e.g. "eval.inner_steps=20"); `device`: default the first
    GPU, else the CPU."""
    model, cfg = load_model(path)
    if overrides:
        cfg = override(cfg, list(overrides))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Learner(model.to(device).eval(), cfg, device)


class Learner:
    """A trained model with its run's preprocessing and test-time adaptation."""

    def __init__(self, model, cfg, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.images = Images(preprocessing(cfg.data))
        self.algo = get(cfg.algo)
        self.head_init = self.algo.head_init(cfg.algo)
        # a learned head has a row per class it was trained for; the others as many as a task has
        self.max_ways = model.head.out_features if self.head_init == "learned" else None
        self.params = dict(model.named_parameters())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.images.shape

    def preprocess(self, images) -> torch.Tensor:
        """Images (see the module's docstring) -> (n, C, H, W) float in [0, 1] on the learner's
        device: the tensor the model sees (metadist.data.images)."""
        try:
            return self.images.tensor(images).to(self.device)
        except ImageError as e:
            raise APIError(str(e)) from None

    def embed(self, images) -> torch.Tensor:
        """The body's features of `images` (n, feature_dim), BatchNorm on their own statistics:
        what ProtoNets and pre-training compare with prototypes."""
        x = self.preprocess(images)
        with torch.no_grad():
            return self.model.features(x)

    def logits_many(self, tasks: list, xs: list) -> list[torch.Tensor]:
        """Tasks' logits of their preprocessed images `xs` ((n, C, H, W) each), computed together
        where the shapes allow (as `metadist evaluate` does)."""
        return _logits_many(tasks, xs)

    def export_embedding(self, path, images: int = 0) -> Path:
        """The embedding network alone to `path` (.onnx or .pt2, metadist.export): preprocessed
        images (n, C, H, W) -> features (n, feature_dim); `images`: the batch it is traced with
        (default the run's query images per task)."""
        from metadist.export import Embedding, write

        n = images or self.cfg.data.ways * self.cfg.data.queries
        return write(Embedding(self.model).eval(), (n, *self.image_shape), Path(path), self.device)

    def inner(self, ways: int):
        return eval_inner(self.cfg.algo, self.cfg.eval, self.model, ways)

    def adapt(self, support, labels) -> Task:
        """The task `support` (images) labelled `labels` (ints 0..ways-1, every class at least
        once) defines, adapted to."""
        return self.adapt_many([(support, labels)])[0]

    def adapt_many(self, tasks: list, names: list | None = None) -> list[Task]:
        """[(support, labels), ...] -> their adapted Tasks; tasks of one shape adapt together,
        eval.tasks_per_batch at a time. An error names the task (by `names`, else its index)."""
        prepared = []
        for i, (s, y) in enumerate(tasks):
            try:
                prepared.append(self._task(s, y))
            except APIError as e:
                if names is None and len(tasks) == 1:
                    raise
                raise APIError(f"task {names[i] if names else i}: {e}") from None
        out: list = [None] * len(prepared)
        groups: dict = {}
        for i, (x, y) in enumerate(prepared):
            groups.setdefault((tuple(x.shape), tuple(y.tolist())), []).append(i)
        size = max(1, self.cfg.eval.tasks_per_batch)
        parts = [idx[s : s + size] for idx in groups.values() for s in range(0, len(idx), size)]
        for idx in parts:
            x = torch.stack([prepared[i][0] for i in idx])
            y = torch.stack([prepared[i][1] for i in idx])
            for j, task in zip(idx, self._adapt(x, y)):
                out[j] = task
        return out

    def _task(self, support, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(support (n, C, H, W), labels (n,)) in class-major order, checked."""
        x = self.preprocess(support)
        y = _labels(labels, x.shape[0])
        ways = int(y.max()) + 1
        missing = sorted(set(range(ways)) - set(y.tolist()))
        if missing:
            raise APIError(
                f"labels: class {missing[0]} has no support image (labels must be 0..ways-1, "
                "each class at least once)"
            )
        if self.max_ways is not None and ways > self.max_ways:
            raise APIError(
                f"labels: {ways} classes, but this run's learned head has {self.max_ways} rows "
                f"(algo.head_init=learned); give at most {self.max_ways} classes"
            )
        order = torch.sort(y, stable=True).indices  # class-major, as training's episodes
        return x[order], y[order].to(self.device)

    def _adapt(self, x: torch.Tensor, y: torch.Tensor) -> list[Task]:
        """Tasks (T, n, C, H, W) with the same labels y (T, n), adapted together."""
        ways = int(y.max()) + 1
        counts = torch.bincount(y[0], minlength=ways)
        batch = {"x_support": x, "y_support": y}
        if bool((counts != counts[0]).any()) or (
            self.max_ways is not None and ways < self.max_ways
        ):
            # classes with different numbers of shots, or fewer than the head's rows: each
            # task's own classes (Meta-Dataset's variable episodes' path)
            batch["ways"] = torch.full((x.shape[0],), ways, device=self.device)
        inner = self.inner(ways)
        forward, fast = adapt_task(self.model, self.params, batch, inner)
        step = max(0, inner.steps - 1)
        tasks = []
        for t in range(x.shape[0]):
            weights = {k: v[t : t + 1] for k, v in fast.items()}
            tasks.append(Task(self, forward, weights, step, ways))
        return tasks


def _logits_many(tasks: list, xs: list) -> list[torch.Tensor]:
    """Each task's logits of its images, tasks with images of one shape computed together,
    eval.tasks_per_batch at a time (as `metadist evaluate` does)."""
    out: list = [None] * len(tasks)
    groups: dict = {}
    for i, (t, x) in enumerate(zip(tasks, xs)):
        groups.setdefault((tuple(x.shape), t.step), []).append(i)
    size = max(1, tasks[0].learner.cfg.eval.tasks_per_batch) if tasks else 1
    for idx in [g[s : s + size] for g in groups.values() for s in range(0, len(g), size)]:
        first = tasks[idx[0]]
        weights = {k: torch.cat([tasks[i].weights[k] for i in idx]) for k in first.weights}
        x = torch.stack([xs[i].to(first.learner.device) for i in idx])
        with torch.no_grad():
            logits = first.forward(weights, x, first.step)
        for j, i in enumerate(idx):
            out[i] = logits[j, :, : tasks[i].ways]  # a learned head may be wider than the task
    return out


class Task:
    """A learner adapted to one task: `logits`, `probabilities`, `predict` of query images, and
    `export` of its classifier."""

    def __init__(self, learner: Learner, forward, weights: dict, step: int, ways: int):
        self.learner, self.forward, self.weights, self.step, self.ways = (
            learner,
            forward,
            weights,
            step,
            ways,
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) preprocessed images (learner.preprocess) -> (n, ways) logits."""
        return self.learner.logits_many([self], [x])[0]

    def probabilities(self, images) -> torch.Tensor:
        return self.logits(self.learner.preprocess(images)).softmax(-1)

    def predict(self, images) -> torch.Tensor:
        """Each image's class, (n,) int64."""
        return self.logits(self.learner.preprocess(images)).argmax(-1)

    def module(self) -> torch.nn.Module:
        """This task's classifier as a plain module: preprocessed images (n, C, H, W) -> logits."""
        from metadist.export import TaskClassifier

        return TaskClassifier(self.learner.model, self.weights, self.step, self.ways)

    def export(self, path, queries: int = 0) -> Path:
        """The classifier (`module()`) written to `path`: ONNX for .onnx, a torch.export program
        for .pt2 (metadist.export). `queries`: the batch the graph is traced with (default the
        run's query images per task)."""
        from metadist.export import write

        learner = self.learner
        n = queries or learner.cfg.data.ways * learner.cfg.data.queries
        shape = (n, *learner.image_shape)
        return write(self.module().eval(), shape, Path(path), learner.device)


def support_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """A task's support on disk -> (image paths, labels, class names): a subfolder of images per
    class (classes in name order), or the exercise's support/NNNN/ (image_i.png is class i)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise APIError(f"{folder}: not a folder (the task's support images)")
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subs:
        paths, labels = [], []
        for c, sub in enumerate(subs):
            files = sorted(p for p in sub.iterdir() if p.suffix.lower() in SUFFIXES)
            if not files:
                raise APIError(f"{sub}: no images (each class folder holds its support images)")
            paths += files
            labels += [c] * len(files)
        return paths, labels, [p.name for p in subs]
    files = {p.name: p for p in folder.glob("image_*.png")}
    n = len(files)
    if not n or set(files) != {f"image_{i}.png" for i in range(n)}:
        raise APIError(
            f"{folder}: expected a subfolder per class, or image_0.png .. image_N.png (class i)"
        )
    return [files[f"image_{i}.png"] for i in range(n)], list(range(n)), [str(i) for i in range(n)]


def _labels(labels, n: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels))
    whole = y.is_floating_point() and torch.equal(y, y.round())
    if y.dtype == torch.bool or (y.is_floating_point() and not whole):
        raise APIError(f"labels: {y.dtype} values; give integer classes 0..ways-1")
    y = y.long().reshape(-1)
    if y.numel() != n:
        raise APIError(f"labels: {y.numel()} labels for {n} support images")
    if n == 0:
        raise APIError("support: no images")
    if int(y.min()) < 0:
        raise APIError(f"labels: {int(y.min())} is not a class; labels are 0..ways-1")
    return y


_NUM = re.compile(r"^\d+$")
_IMG = re.compile(r"^image_(\d+)\.png$")


def task_folder(tasks_dir: Path) -> list[tuple[str, list[Path], list[Path]]]:
    """The exercise's layout (support/NNNN/image_i.png is class i; query/NNNN/image_j.png) ->
    [(task id, support image paths, query image paths)] in task order."""
    tasks_dir = Path(tasks_dir)
    sup, qry = tasks_dir / "support", tasks_dir / "query"
    if not sup.is_dir() or not qry.is_dir():
        raise APIError(f"{tasks_dir}: expected folders support/ and query/")
    ids = sorted((p.name for p in sup.iterdir() if p.is_dir() and _NUM.match(p.name)), key=int)
    if not ids:
        raise APIError(f"{sup}: no task folders (NNNN)")

    def images(folder: Path) -> list[Path]:
        files = sorted(
            ((int(m[1]), p) for p in folder.glob("*.png") if (m := _IMG.match(p.name))),
            key=lambda t: t[0],
        )
        if not files:
            raise APIError(f"{folder}: no image_i.png files")
        if [i for i, _ in files] != list(range(len(files))):
            raise APIError(
                f"{folder}: images must be image_0.png .. image_{len(files) - 1}.png without gaps"
            )
        return [p for _, p in files]

    out = []
    for i in ids:
        if not (qry / i).is_dir():
            raise APIError(f"{qry / i}: missing (support/{i} has no query folder)")
        out.append((i, images(sup / i), images(qry / i)))
    return out


def predict_folder(learner: Learner, tasks_dir: Path, out_csv: Path) -> int:
    """`metadist predict`: adapt to each task of `tasks_dir` (task_folder's layout) and write
    `id,class` rows, one per query image in task order, to `out_csv`. Returns the task count."""
    tasks = task_folder(tasks_dir)
    ids = [i for i, _, _ in tasks]
    adapted = learner.adapt_many([(s, list(range(len(s)))) for _, s, _ in tasks], ids)
    queries = []
    for i, _, q in tasks:
        try:
            queries.append(learner.preprocess(q))
        except APIError as e:
            raise APIError(f"task {i}: {e}") from None
    rows = [
        c for logits in learner.logits_many(adapted, queries) for c in logits.argmax(-1).tolist()
    ]
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "class"])
        w.writerows(enumerate(rows))
    return len(tasks)
