"""The one owner of a run's step count and meta learning rate: `Schedule` (linear warm-up, then
constant or a cosine to 0 at the last step), and `BudgetFit`, which fixes the step count that fits
train.max_minutes (train.budget_schedule) once it has timed the run's first steps.

The count is train.steps until a budget fits another (at most train.steps); it is part of the
schedule's state, so a resumed run keeps it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from metadist.machine import cached


class Schedule:
    """Step count and learning-rate factor of step s (0-based): (s+1)/warmup during the warm-up;
    then 1 (constant) or 0.5 (1 + cos(pi (s - start) / (total - start))) (cosine), where the
    cosine starts after the warm-up and after `hold` (the budget probe: the rate before the count
    is fixed cannot depend on it)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int,
        kind: str = "constant",
        warmup: int = 0,
        hold: int = 0,
    ):
        self.limit, self.kind, self.warmup, self.hold = steps, kind, warmup, hold
        self.fixed = 0  # the budget's count, once fixed (0: not fixed)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.factor(step)
        )

    @property
    def total(self) -> int:
        """The step the schedule ends at."""
        return self.fixed or self.limit

    def factor(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind != "cosine":
            return 1.0
        start = max(self.warmup, self.hold)
        if step < start:
            return 1.0
        span = max(1, self.total - start)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / span)))

    def fix(self, steps: int) -> None:
        self.fixed = steps

    def step(self) -> None:
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "steps": self.fixed}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.fixed = state.get("steps") or 0


class ProbeWork(NamedTuple):
    """What the budget schedule times besides the steps: validate() -> episodes, one validation
    on a few val episodes; checkpoint() -> seconds, one checkpoint written (and removed)."""

    validate: Callable[[], int]
    checkpoint: Callable[[], float]


class BudgetFit:
    """train.budget_schedule: lay the step count (and the cosine) over train.max_minutes. The run
    times its steps from step 3 to `train.budget_probe` (the learning rate holds until then, so the
    count cannot change them; the timing is wall time, so data, logging and the step itself), one
    validation on a few val episodes and one checkpoint write; rank 0 turns these into the steps
    that fit the budget (each validation also writes the best weights, about a checkpoint; 3%
    spare; at most train.steps) and every rank takes that count.
    The timings are a machine fact (metadist/machine.py, per CPU, torch, threads and the run's
    shape): the same command on the same machine gets the same count, hence the same weights.
    The count is recorded in <run>/schedule.json and in every checkpoint."""

    WARM = 3

    def __init__(self, t, val_episodes: int, shape: dict, dist, run_dir: Path, work, say):
        """t: the train section; shape: what the step's time depends on (the cache key, with the
        machine); work: the ProbeWork to time."""
        self.on, self.probe, self.t, self.val_episodes, self.dist, self.say = (
            t.budget_schedule,
            t.budget_probe,
            t,
            val_episodes,
            dist,
            say,
        )
        self.shape = dict(
            shape, world=dist.world, meta_batch_size=t.meta_batch_size, val_every=t.val_every
        )
        self.path, self.work = Path(run_dir) / "schedule.json", work
        self.t0 = self.s0 = None

    def maybe_fix(self, step: int, schedule: Schedule) -> bool:
        """Call after every step (`step` steps done); fixes the schedule's count at the probe.
        Returns whether it did so now."""
        if not self.on or schedule.fixed:
            return False
        if self.t0 is None and step >= min(self.WARM, self.probe - 1):
            self.t0, self.s0 = time.perf_counter(), step
        if step < self.probe:
            return False
        rec = self.dist.broadcast_object(self._timings(step) if self.dist.is_main else None)
        t = self.t
        ckpt_s = rec.get("ckpt_s", 0.0)
        per_step = (
            rec["step_s"] + (rec["val_s"] + ckpt_s) / t.val_every + ckpt_s / t.checkpoint_every
        )
        fit = int(60 * t.max_minutes * 0.97 / per_step)
        schedule.fix(max(self.probe + 1, min(t.steps, fit)))
        if self.dist.is_main:
            self.path.write_text(
                json.dumps(dict(rec, steps=schedule.total, fits=fit), indent=1) + "\n"
            )
            where = "cached" if rec.get("cached") else "measured"
            self.say(
                f"train.budget_schedule: {rec['step_s']:.3f} s/step, {rec['val_s']:.1f} s per "
                f"validation and {ckpt_s:.2f} s per checkpoint "
                f"({where}{', ' + rec['cache'] if rec.get('cache') else ''}): {fit} steps fit "
                f"{t.max_minutes:g} min; the schedule ends at step {schedule.total}"
            )
        return True

    def _timings(self, step: int) -> dict:
        timed = time.perf_counter() - self.t0, step - self.s0

        def measure():
            t = time.perf_counter()
            episodes = self.work.validate()
            val_s = (
                (time.perf_counter() - t) * self.val_episodes / max(1, episodes) / self.dist.world
            )
            return {
                "step_s": timed[0] / max(1, timed[1]),
                "val_s": val_s,
                "ckpt_s": self.work.checkpoint(),
            }

        return cached("budget", self.shape, measure, self.say)
