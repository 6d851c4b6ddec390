"""Delivery to the device, which owns residency: `meta_batches(source, spec)` gives a rank's
training batches from the host (a DataLoader over metadist/data/order.py's readers) or, where the
split fits the device (`fits_device`, data.device_cache), from the split held there
(`ResidentBatches`: a step is two index gathers); `Prefetch` copies host batches to a GPU ahead of
their use.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import torch

from metadist.data.order import (
    MetaBatches,
    MixedBatches,
    StreamSpec,
    VariableBatches,
    loader,
)
from metadist.data.split import EpisodeSource, MappedPool


class ResidentBatches(MetaBatches):
    """The same meta-batches as MetaBatches, from the split's pool and records held on
    `spec.device` (each shard read and checked once): a step is two index gathers and the
    recorded rotations, and the conversion to float and the task augmentation run on the device."""

    def __init__(self, source: EpisodeSource, spec: StreamSpec):
        super().__init__(source, spec)
        index, turns = source.table()
        self.starts = np.concatenate([[0], np.cumsum(source.counts)])
        pool = source.pool
        self.pool = torch.from_numpy(pool.array() if isinstance(pool, MappedPool) else pool).to(
            spec.device
        )
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


def meta_batches(source, spec: StreamSpec, weights: list[float] | None = None):
    """Iterator over this rank's share of the episode meta-batches of `spec` (resident on
    `spec.device` when given). `source`: an EpisodeSource, or a local split folder; or a list of
    EpisodeSources (many sources: MixedBatches, each task's source drawn by `weights`, uniform if
    None)."""
    if isinstance(source, list):
        if len(source) > 1:
            w = weights or list(spec.source_weights) or [1.0] * len(source)
            return loader(MixedBatches(source, w, spec), spec.num_workers)
        source = source[0]
    if not isinstance(source, EpisodeSource):
        source = EpisodeSource(source, None, spec.seed)
    if source.variable:  # padded on the host, step by step
        return loader(VariableBatches(source, spec), spec.num_workers)
    if spec.device is not None:  # the whole split resident on the device (no workers needed)
        return iter(ResidentBatches(source, spec))
    return loader(MetaBatches(source, spec), spec.num_workers)


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
