"""Delivery to the device, which owns residency and prefetch for every algorithm's stream:
`Delivery` decides once whether the train split is held on the device (`fits_device`,
data.device_cache) and wraps a host stream in `Prefetch` (host batches copied to a GPU ahead of
their use); `meta_batches(source, spec)` (episodes) and `class_batches(source, spec, group)`
(pre-training's labelled images) give a rank's batches from the host (a DataLoader over
metadist/data/order.py's readers) or from the split held on `spec.device` (`ResidentBatches`,
`ResidentClassBatches`: a step is index gathers there).
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import torch

from metadist.data.episodes import to_float
from metadist.data.order import (
    ClassBatches,
    MetaBatches,
    MixedBatches,
    StreamSpec,
    VariableBatches,
    loader,
)
from metadist.data.split import EpisodeSource, MappedPool


def _on_device(source: EpisodeSource, device) -> torch.Tensor:
    """The split's pool (read and checked once) as a tensor on `device`."""
    pool = source.pool
    return torch.from_numpy(pool.array() if isinstance(pool, MappedPool) else pool).to(device)


class ResidentBatches(MetaBatches):
    """The same meta-batches as MetaBatches, from the split's pool and records held on
    `spec.device` (each shard read and checked once): a step is two index gathers and the
    recorded rotations, and the conversion to float and the task augmentation run on the device."""

    def __init__(self, source: EpisodeSource, spec: StreamSpec):
        super().__init__(source, spec)
        index, turns = source.table()
        self.starts = np.concatenate([[0], np.cumsum(source.counts)])
        self.pool = _on_device(source, spec.device)
        self.index = torch.from_numpy(index).to(spec.device)
        self.turns = torch.from_numpy(turns.astype(np.int64)).to(spec.device)[..., None, None, None]

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        where = [self.source.locate(step * self.batch + t) for t in self.tasks]
        idx = torch.tensor([int(self.starts[j]) + i for j, i in where]).to(
            self.index.device, non_blocking=True
        )
        # (tasks, n, C, H, W), (tasks, n, 1, 1, 1)
        x, k = self.pool[self.index[idx]], self.turns[idx]
        # no host sync: a select, not a branch
        for turns in (1, 2, 3):
            x = torch.where(k == turns, torch.rot90(x, turns, dims=(-2, -1)), x)
        return self._finish(x, step)


def meta_batches(source, spec: StreamSpec):
    """Iterator over this rank's share of the episode meta-batches of `spec` (resident on
    `spec.device` when given). `source`: an EpisodeSource, or a local split folder; or a list of
    EpisodeSources (many sources: MixedBatches, each task's source drawn by spec.source_weights,
    uniform if empty)."""
    if isinstance(source, list):
        if len(source) > 1:
            w = list(spec.source_weights) or [1.0] * len(source)
            return loader(MixedBatches(source, w, spec), spec.num_workers)
        source = source[0]
    if not isinstance(source, EpisodeSource):
        source = EpisodeSource(source, None, spec.seed)
    if source.variable:  # padded on the host, step by step
        return loader(VariableBatches(source, spec), spec.num_workers)
    if spec.device is not None:  # the whole split resident on the device (no workers needed)
        return iter(ResidentBatches(source, spec))
    return loader(MetaBatches(source, spec), spec.num_workers)


class ResidentClassBatches(ClassBatches):
    """Pre-training's batches (ClassBatches: the same images and labels), gathered from the split
    held on `spec.device`: the order is drawn on the host, the images never leave the device."""

    def __init__(self, source: EpisodeSource, spec: StreamSpec, group: int):
        super().__init__(source, spec, group)
        self.pool = _on_device(source, spec.device)
        self.on_device = torch.from_numpy(self.labels).to(spec.device)

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.indices(step)).to(self.pool.device, non_blocking=True)
        x, y = to_float(self.pool[idx]), self.on_device[idx]
        b = {"x_support": x, "y_support": y, "x_query": x[:, :0], "y_query": y[:, :0]}
        return self._augment(b, step)


def class_batches(source: EpisodeSource, spec: StreamSpec, group: int):
    """Iterator over this rank's share of pre-training's labelled image batches (ClassBatches),
    from the split held on `spec.device` when given."""
    if spec.device is not None:
        return iter(ResidentClassBatches(source, spec, group))
    return loader(ClassBatches(source, spec, group), spec.num_workers)


class Delivery:
    """Where a rank's training batches come from, decided once for a run: the train split held on
    the device (`resident`: one source of fixed episodes that fits it, data.device_cache), or
    gathered on the host and, on a GPU, copied one step ahead (`wrap`). `free`: the device's free
    bytes (default: asked of CUDA; a test gives it)."""

    def __init__(self, d, device, split: EpisodeSource, many: bool, free: int | None = None):
        self.device = torch.device(device)
        fits = not (split.variable or many) and fits_device(
            split.manifest["bytes"], self.device, d.device_cache, d.device_cache_fraction, free
        )
        self.resident = self.device if fits else None  # StreamSpec.device

    def wrap(self, stream):
        """The algorithm's stream as the step takes it: a host stream prefetched onto a GPU."""
        if self.device.type == "cuda" and self.resident is None:
            return Prefetch(stream, self.device)
        return stream


def fits_device(nbytes: int, device, mode: str, fraction: float, free: int | None = None) -> bool:
    """data.device_cache: `on` | `off` | `auto`: on a CUDA device whose free memory (or `free`)
    times `fraction` (data.device_cache_fraction) holds the split's `nbytes` (pool and records)."""
    if mode != "auto":
        return mode == "on"
    if getattr(device, "type", device) != "cuda":
        return False
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return nbytes <= fraction * free


_END = object()


class Prefetch:
    """Batches moved to `device` ahead of their use, for a split too big to keep on the device: a
    thread gathers each batch on the host, pins it and copies it without blocking on a side CUDA
    stream, `depth` batches ahead, while the steps run; a step's stream waits for its own batch
    only. On a CPU the move is the identity, so the ordering, the depth and the errors (a failing
    gather is raised in the consumer) are what a CPU test checks."""

    def __init__(self, batches, device, depth: int = 2):
        self.batches, self.device, self.depth = batches, torch.device(device), depth
        self.cuda = self.device.type == "cuda"

    def _move(self, batch: dict, stream) -> tuple:
        if not self.cuda:
            return batch, None, None
        with torch.cuda.stream(stream):
            host = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            moved = {
                k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in host.items()
            }
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done, host  # the pinned host copy lives until the copy is done

    def _ready(self, item: tuple) -> dict:
        batch, done, _ = item
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for v in batch.values():
                if torch.is_tensor(v):
                    v.record_stream(current)
        return batch

    def __iter__(self):
        q, stop = queue.Queue(maxsize=self.depth), threading.Event()

        def work():
            try:
                stream = torch.cuda.Stream(self.device) if self.cuda else None
                for b in self.batches:
                    if stop.is_set():
                        return
                    q.put(self._move(b, stream))
                q.put(_END)
            except BaseException as e:  # raised again in the consumer
                q.put(e)

        worker = threading.Thread(target=work, name="metadist-prefetch", daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield self._ready(item)
        finally:
            stop.set()
            while worker.is_alive():
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)
