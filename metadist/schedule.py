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

from metadist import log
from metadist.machine import cached, provenance


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
        self.fits = 0  # how many times a budget fixed it (BudgetFit: at the probe, then the refit)
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
        self.fixed, self.fits = steps, self.fits + 1

    def step(self) -> None:
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "steps": self.fixed, "fits": self.fits}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.fixed = state.get("steps") or 0
        # a checkpoint of before the refit counted one fit; an older one's single fit was final
        self.fits = state.get("fits", 2 if self.fixed else 0)


class ProbeWork(NamedTuple):
    """What the budget schedule times besides the steps: validate() -> episodes, one validation
    on a few val episodes; checkpoint() -> seconds, one checkpoint written (and removed)."""

    validate: Callable[[], int]
    checkpoint: Callable[[], float]


# with train.budget_schedule the fitted count ends the run, and the hard stop waits this multiple
# of the budget: a machine running slower than its cached timings (an AMD Zen 3 here ran one
# command 17-19% slower on some runs than on others) still ends its schedule, later, with the
# weights the same command gives on a good day; a time stop there would give other weights
OVERRUN = 1.25


def time_limit(t) -> float:
    """The run's hard stop, seconds of training (train section `t`; inf: none): train.max_minutes,
    or OVERRUN of it with train.budget_schedule."""
    if not t.max_minutes:
        return math.inf
    return 60 * t.max_minutes * (OVERRUN if t.budget_schedule else 1.0)


def overran(t, seconds: float) -> str | None:
    """What to say when a run with a fitted schedule took longer than its budget (None if not)."""
    if not (t.budget_schedule and t.max_minutes) or seconds <= 60 * t.max_minutes:
        return None
    return (
        f"train.budget_schedule: the schedule took {seconds / 60:.1f} min of a "
        f"{t.max_minutes:g}-min budget: this machine ran slower than its cached timings (the "
        f"same command gives the same weights; a run stops on time only past "
        f"{OVERRUN * t.max_minutes:g} min)"
    )


class BudgetFit:
    """train.budget_schedule: lay the step count (and the cosine) over train.max_minutes, in two
    fits. At the probe (`train.budget_probe` steps; the learning rate holds until then, so the
    count cannot change them) the run has timed its steps from step 3 (wall time: data, logging
    and the step itself), one validation on a few val episodes and one checkpoint write, and rank 0
    fixes the count that fits the budget (the validations and checkpoints it will take counted one
    by one, the last step's own included; each validation also writes the best weights, about a
    checkpoint). The first steps of a run are not its steady rate (caches and pages warming, the
    CPU's clock settling: on an Intel Xeon they ran 15% slower than the rest, on an AMD Zen 3 16%
    faster), so at REFIT of that count the run fits again from the steps since the probe (their
    validations and checkpoints taken out at the probe's cost, then counted per step), with SPARE
    of the budget left over; every rank takes each count.
    Both timings are machine facts (metadist/machine.py, per CPU, its kernels, torch, threads and
    the run's shape): the same command on the same machine gets the same counts, hence the same
    weights. The counts are recorded in <run>/schedule.json and in every checkpoint (a resumed run
    keeps them)."""

    WARM = 3
    REFIT = 0.25  # the second fit, at this fraction of the first count
    SPARE = 0.985  # of the budget the fitted steps may use

    def __init__(self, t, val_episodes: int, shape: dict, dist, run_dir: Path, work):
        """t: the train section; shape: what the step's time depends on (the cache key, with the
        machine); work: the ProbeWork to time."""
        self.on, self.probe, self.t = t.budget_schedule, t.budget_probe, t
        self.val_episodes, self.dist = val_episodes, dist
        self.shape = dict(
            shape, world=dist.world, meta_batch_size=t.meta_batch_size, val_every=t.val_every
        )
        self.path, self.work = Path(run_dir) / "schedule.json", work
        self.t0 = self.s0 = None
        self.first: dict = {}  # the probe's record

    def maybe_fix(self, step: int, schedule: Schedule) -> bool:
        """Call after every step (`step` steps done); fixes the schedule's count at the probe and
        again at the refit. Returns whether it did so now."""
        if not self.on or schedule.fits >= 2:
            return False
        if self.t0 is None and step >= min(self.WARM, self.probe - 1):
            self.t0, self.s0 = time.perf_counter(), step
        if schedule.fits == 0:
            return step >= self.probe and self._probe(step, schedule)
        if not self.first:  # resumed between the probe and the refit: the probe's record
            probe = {}
            if self.dist.is_main and self.path.is_file():
                probe = json.loads(self.path.read_text()).get("probe", {})
            self.first = self.dist.broadcast_object(probe)
        return step >= self.refit_at(schedule) and self._refit(step, schedule)

    def refit_at(self, schedule: Schedule) -> int:
        return max(self.probe + 1, round(self.REFIT * schedule.fixed))

    def _overhead(self, lo: int, hi: int) -> float:
        """Seconds of validation and checkpoint writing in steps (lo, hi], at the probe's cost."""
        t, rec = self.t, self.first
        val, ckpt = rec.get("val_s", 0.0), rec.get("ckpt_s", 0.0)
        vals, ckpts = (
            hi // t.val_every - lo // t.val_every,
            hi // t.checkpoint_every - lo // t.checkpoint_every,
        )
        return vals * (val + ckpt) + ckpts * ckpt

    def _total(self, n: int, step_s: float, lo: int = 0, head: float = 0.0) -> float:
        """Seconds to train to step n: `head` (the time at step lo), the steps from lo at step_s,
        the validations and checkpoints in (lo, n], and the last step's own (every run validates
        and checkpoints at its end)."""
        t, val, ckpt = self.t, self.first.get("val_s", 0.0), self.first.get("ckpt_s", 0.0)
        last = (val + ckpt if n % t.val_every else 0.0) + (ckpt if n % t.checkpoint_every else 0.0)
        return head + (n - lo) * step_s + self._overhead(lo, n) + last

    def _fit(self, step_s: float, lo: int = 0, head: float = 0.0) -> int:
        """The most steps (past lo, at most train.steps) whose _total fits SPARE of the budget."""
        budget, n = 60 * self.t.max_minutes * self.SPARE, lo
        while n < self.t.steps and self._total(n + 1, step_s, lo, head) <= budget:
            n += 1
        return n

    def _probe(self, step: int, schedule: Schedule) -> bool:
        self.first = rec = self.dist.broadcast_object(
            self._timings(step) if self.dist.is_main else None
        )
        fit = self._fit(rec["step_s"])
        schedule.fix(max(self.probe + 1, fit))
        self.t0, self.s0 = time.perf_counter(), step  # the refit times the steps from here
        self._record(schedule, probe=dict(rec, fits=fit))
        return True

    def _refit(self, step: int, schedule: Schedule) -> bool:
        lo, hi = self.probe, self.refit_at(schedule)

        def measure():
            spent = time.perf_counter() - self.t0 - self._overhead(self.s0, step)
            return {"steady_step_s": spent / max(1, step - self.s0)}

        key = dict(self.shape, probe=lo, refit=hi)
        rec = self.dist.broadcast_object(
            cached("budget-steady", key, measure) if self.dist.is_main else None
        )
        # the time at `hi` as the cached timings say it (not this launch's clock: the same
        # command must reach the same count), then the steps the rest of the budget holds
        steady = rec["steady_step_s"]
        at_hi = lo * self.first.get("step_s", steady) + (hi - lo) * steady + self._overhead(0, hi)
        fit = self._fit(steady, hi, at_hi)
        schedule.fix(max(hi + 1, fit))
        self._record(schedule, refit=dict(rec, at=hi, fits=fit))
        return True

    def _record(self, schedule: Schedule, **fit) -> None:
        """schedule.json and the log line (main process)."""
        if not self.dist.is_main:
            return
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.path.write_text(json.dumps(dict(old, **fit, steps=schedule.total), indent=1) + "\n")
        rec, t = self.first, self.t
        where = provenance(rec)
        if "probe" in fit:
            log.say(
                f"train.budget_schedule: {rec['step_s']:.3f} s/step, {rec['val_s']:.1f} s per "
                f"validation and {rec.get('ckpt_s', 0.0):.2f} s per checkpoint ({where}): "
                f"{fit['probe']['fits']} steps fit {t.max_minutes:g} min; the schedule ends at "
                f"step {schedule.total}"
            )
        else:
            r = fit["refit"]
            log.say(
                f"train.budget_schedule: {r['steady_step_s']:.3f} s/step from the probe to step "
                f"{r['at']} ({provenance(r)}): the schedule ends at "
                f"step {schedule.total}"
            )

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

        return cached("budget", self.shape, measure)
