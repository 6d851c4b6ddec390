"""The training loop's components, each owning its cadence: `StopVotes` (when every rank stops,
agreed through the gradient reduction, on the training `Clock`), `Logger` (metrics summed on the
device, one record every `every` steps: metrics.jsonl, W&B, the progress display), `Validator`
(the fixed val episodes every `every` steps, the best weights), `Progress` (a bar on a terminal,
plain lines in a log file). The Trainer (metadist/train.py) builds them once and `fit()` calls them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from metadist import log
from metadist.checkpoint import TrainState
from metadist.data.store import ShardError, mapped_fault
from metadist.errors import Preempted
from metadist.signals import StopSignals
from metadist.step import TrainError


class Clock:
    """The run's training time: what earlier launches trained (`before`, seconds) plus this one's
    since `start()`."""

    def __init__(self, before: float = 0.0):
        self.before, self.t0 = before, None

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return self.before + (time.perf_counter() - self.t0 if self.t0 is not None else 0.0)


class StopVotes:
    """Whether to stop after this step, agreed by all ranks: each rank votes (rank 0 for the
    wall-clock bound `limit_s`; every rank for a signal it received, and for a shard changed under
    it: `fault()` names one); the votes are summed or averaged in the gradient reduction and read
    on the host every `every` steps (the same steps on every rank, so all stop at the same one,
    and all know why)."""

    def __init__(
        self, limit_s: float, every: int, signals: StopSignals, device, clock, fault=mapped_fault
    ):
        """clock() -> the run's training time so far (a Clock); fault() -> a changed shard's
        name, or None."""
        self.limit, self.every, self.signals, self.pending = limit_s, every, signals, None
        self.fault, self.faulted, self.clock = fault, None, clock
        # every possible vote (time, signal, fault), already on the device: picking one is a
        # view, never a host->device copy
        self.table = torch.tensor(
            [[float(b) for b in (k & 4, k & 2, k & 1)] for k in range(8)], device=device
        ).clamp_(max=1)

    def votes(self) -> torch.Tensor:
        self.faulted = self.faulted or self.fault()
        time_up = self.clock() >= self.limit
        return self.table[
            4 * time_up + 2 * (self.signals.received is not None) + (self.faulted is not None)
        ]

    def raise_for(self, stop: str | None, step: int, checkpoints: Path) -> None:
        """A shard changed ("fault") or a signal: the error that says the checkpoint of `step` is
        written and what to do."""
        path = checkpoints / f"step_{step:06d}"
        if stop == "fault":
            what = self.faulted or self.fault() or "a pool shard changed on another rank"
            raise ShardError(
                f"{what}: stopped after step {step}, checkpoint {path} written; put the shard back "
                "(`metadist verify` checks it) and launch again"
            )
        if stop == "signal":
            raise Preempted(
                f"stopped by {self.signals.received or 'a signal on another rank'} after step "
                f"{step}: checkpoint {path} written; launch the same command again to resume"
            )

    def check(self, agreed: torch.Tensor, step: int) -> str | None:
        """None, "time", "signal" or "fault" (a shard changed under some rank; it wins)."""
        self.pending = agreed if self.pending is None else torch.maximum(self.pending, agreed)
        if step % self.every:
            return None
        time_vote, signal_vote, fault_vote = self.pending.tolist()
        self.pending = None
        if fault_vote > 0:
            return "fault"
        return "signal" if signal_vote > 0 else "time" if time_vote > 0 else None


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise one plain line per log record (a bar
    redrawn with \\r every step makes a log file one unreadable line). Main process only.
    `total()` is the schedule's step count (it may be fixed after the first steps)."""

    def __init__(self, total, initial: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar = (
            tqdm(total=total(), initial=initial, dynamic_ncols=True, file=sys.stderr)
            if enabled and sys.stderr.isatty()
            else None
        )

    def show(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                acc=f"{rec['accuracy']:.3f}",
                tps=f"{rec['tasks_per_s']:.0f}",
            )
        elif self.enabled:
            log.say(
                f"step {rec['step']}/{self.total()}: loss {rec['loss']:.4f} accuracy "
                f"{rec['accuracy']:.4f} "
                f"{rec['tasks_per_s']:.1f} tasks/s lr {rec['lr']:.3g} ({rec['elapsed_s'] / 60:.1f} "
                "min)"
            )

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            log.say(line)

    def update(self) -> None:
        if self.bar is not None:
            if self.bar.total != self.total():
                self.bar.total = self.total()
                self.bar.refresh()
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Logger:
    """Loss and accuracy summed on the device between log steps; every `every` steps (and at the
    last) one record: metrics.jsonl (its file, opened by `open`), W&B and the progress display."""

    def __init__(self, every: int, tasks: int, dist, tracker, progress: Progress, lr, names=()):
        """names: the sources' names, when a run has many (per-source accuracy)."""
        self.every, self.tasks, self.dist, self.tracker, self.progress, self.lr = (
            every,
            tasks,
            dist,
            tracker,
            progress,
            lr,
        )
        self.names = list(names)
        self.file = None
        self._reset()

    def open(self, path: Path, resumed_step: int | None) -> None:
        """metrics.jsonl, for appending; on resume, records past the checkpoint's step are dropped;
        a run that never checkpointed starts it anew."""
        if path.exists():
            if resumed_step is None:
                path.unlink()
            else:
                kept = [
                    ln
                    for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resumed_step
                ]
                # replaced whole, never truncated in place: a reader (metadist plot, a tail, a
                # launcher's health check) sees the old file or the new one, never an empty one
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_text("".join(ln + "\n" for ln in kept))
                os.replace(tmp, path)
        self.file = open(path, "a")  # noqa: SIM115 (open for the whole run; closed by close())

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

    @contextlib.contextmanager
    def opened(self, path: Path | None, resumed_step: int | None):
        """metrics.jsonl open for the with-block (`path` None: not this process's to write)."""
        if path is not None:
            self.open(path, resumed_step)
        try:
            yield self
        finally:
            self.close()

    def _reset(self):
        self.loss = self.acc = self.per_source = 0.0
        self.n = self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, loss_sum, acc_sum, local_tasks: int, source=None):
        """A step's sums (meta_backward's); `source`: the batch's one-hot sources (many sources:
        acc_sum is then the total and each source's)."""
        self.loss, self.acc = self.loss + loss_sum, self.acc + acc_sum
        self.n, self.steps = self.n + local_tasks, self.steps + 1
        if source is not None:
            self.per_source = self.per_source + source.sum(0)

    def record(self, state: TrainState, last: bool, grad_norm) -> dict:
        if not (state.step % self.every == 0 or last):
            return {}
        dev = self.dist.device
        acc = torch.as_tensor(self.acc, device=dev, dtype=torch.float32).reshape(-1)
        sums = self.dist.sum(
            torch.cat(
                [
                    torch.as_tensor(self.loss, device=dev, dtype=torch.float32).reshape(1),
                    acc,
                    torch.tensor([float(self.n)], device=dev),
                    torch.as_tensor(self.per_source, device=dev, dtype=torch.float32).reshape(-1),
                ]
            )
        ).tolist()
        if not math.isfinite(sums[0]):
            raise TrainError(f"step {state.step}: non-finite meta-loss")
        n = sums[len(acc) + 1]
        rec = {
            "step": state.step,
            "loss": sums[0] / n,
            "accuracy": sums[1] / n,
            "tasks_per_s": self.steps * self.tasks / (time.perf_counter() - self.t0),
            "lr": self.lr(),
            "grad_norm": float(grad_norm),
            "elapsed_s": state.elapsed,
        }
        if self.names:  # many sources: each one's training accuracy (of the tasks it gave)
            per_acc, counts = sums[2 : len(acc) + 1], sums[len(acc) + 2 :]
            for name, a, c in zip(self.names, per_acc, counts):
                rec[f"accuracy/{name}"] = a / c if c else None
        if dev.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        self._reset()
        self.progress.show(rec)
        return rec

    def write(self, rec: dict):
        if not rec:
            return
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        self.tracker.log(
            {k: v for k, v in rec.items() if k != "step" and v is not None}, rec["step"]
        )


class Validator:
    """Every `every` steps (and at the last): `measure()` ({"val_accuracy": the accuracy on the
    fixed val episodes, and any per-source figures}); the best weights go to the main process's
    `save_best(step, accuracy)`."""

    def __init__(self, every: int, measure, save_best, is_main: bool, progress: Progress):
        self.every, self.measure, self.save_best, self.is_main, self.progress = (
            every,
            measure,
            save_best,
            is_main,
            progress,
        )

    def __call__(self, state: TrainState, last: bool, rec: dict) -> dict:
        if not (state.step % self.every == 0 or last):
            return rec
        measured = self.measure()
        v = measured["val_accuracy"]
        if v > state.best_val:
            state.best_val, state.best_step = v, state.step
            if self.is_main:
                self.save_best(state.step, v)
        self.progress.write(
            f"step {state.step}: val accuracy {v:.4f} (best {state.best_val:.4f} at step "
            f"{state.best_step})"
        )
        return dict(rec or {"step": state.step, "elapsed_s": state.elapsed}, **measured)
