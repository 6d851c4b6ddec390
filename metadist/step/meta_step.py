"""One meta-step, built once from its plan: `MetaStep(step, batch, votes)` reads top to bottom:
adapt and query losses chunk by chunk (the algorithm variant of that step: derivative-order
annealing's first `algo.first_order_steps` steps first order; what the algorithm adds to that
step's batch, such as MAML++'s multi-step loss weights), each chunk's gradients handed to the
reduction, the reduction over ranks (which also carries the stop votes), clipping, Adam and the
schedule. `Trainable` is what it trains: the model, the algorithm in both derivative orders
(`ByOrder`), Adam and its Schedule. The compute (eager, compiled, a CUDA
graph: metadist/step/compute.py) and the reduction (exact, fast: metadist/step/reduce.py) are the
plan's, not branches here. It returns device tensors only: no host sync here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from metadist import algorithms, log
from metadist.errors import MetadistError
from metadist.schedule import Schedule
from metadist.step import reduce
from metadist.step.compute import Compiled, Eager, Graphed, accuracy_sum, chunks, meta_backward
from metadist.step.plan import Plan


class TrainError(MetadistError):
    pass


def check_finite(step: int, loss: torch.Tensor, model: torch.nn.Module) -> None:
    if not torch.isfinite(loss).all():
        raise TrainError(f"step {step}: non-finite meta-loss {loss.item()}")
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise TrainError(f"step {step}: non-finite meta-gradient in {name}")


@contextlib.contextmanager
def anomaly_guard(step: int, debug: bool):
    """In debug mode, anomaly detection's error (naming the backward function that produced a
    non-finite value) becomes a TrainError naming the step."""
    try:
        yield
    except RuntimeError as e:
        if not debug:
            raise
        raise TrainError(
            f"step {step}: non-finite value in the meta-backward: {str(e).splitlines()[0]}"
        ) from None


T = TypeVar("T")


@dataclass(frozen=True)
class ByOrder(Generic[T]):
    """One thing for each derivative order a run trains with: the algorithm as configured, and
    its first-order variant (derivative-order annealing's first steps); `at(first_order)`."""

    configured: T
    first_order: T

    def at(self, first_order: bool) -> T:
        return self.first_order if first_order else self.configured

    def map(self, fn) -> ByOrder:
        return ByOrder(fn(self.configured), fn(self.first_order))


@dataclass(frozen=True)
class StepSettings:
    """What a meta-step does besides its plan: the global and local task counts, clipping,
    derivative-order annealing's first-order steps, the seed of random layers, debug checks and
    bf16 autocast. `StepSettings.of(t, a, seed, local_tasks, device)`."""

    meta_batch_size: int = 1
    local_tasks: int = 1
    clip: float = math.inf
    first_order_steps: int = 0
    seed: int = 0
    debug: bool = False
    bf16: bool = False

    @classmethod
    def of(cls, t, a, seed: int, local_tasks: int, device: torch.device) -> StepSettings:
        """From the train and algo sections and the run's seed."""
        return cls(
            meta_batch_size=t.meta_batch_size,
            local_tasks=local_tasks,
            clip=t.grad_clip if t.grad_clip > 0 else math.inf,
            first_order_steps=a.first_order_steps,
            seed=seed,
            debug=t.debug,
            bf16=t.mixed_precision == "bf16" and device.type == "cuda",
        )


@dataclass
class Trainable:
    """What the step trains, built before the plan: the model, the algorithm in both derivative
    orders, Adam and its Schedule."""

    model: torch.nn.Module
    algorithms: ByOrder
    optimizer: torch.optim.Optimizer
    schedule: Schedule

    @classmethod
    def of(cls, t, a, ways: int, model: torch.nn.Module, device: torch.device) -> Trainable:
        """Adam at train.meta_lr (fused on a GPU: one launch for all tensors), its Schedule (train
        section `t`), the algorithm of section `a` for tasks of `ways` in both derivative
        orders."""
        optimizer = torch.optim.Adam(
            model.parameters(), lr=t.meta_lr, fused=device.type == "cuda" or None
        )
        schedule = Schedule(
            optimizer,
            t.steps,
            t.schedule,
            t.warmup_steps,
            t.budget_probe if t.budget_schedule else 0,
        )
        c = algorithms.get(a)
        variants = ByOrder(c.build(a, model, ways), c.build(a, model, ways, first_order=True))
        return cls(model, variants, optimizer, schedule)

    @property
    def algorithm(self):
        """The algorithm as configured."""
        return self.algorithms.configured

    @property
    def second_order(self) -> bool:
        return self.algorithm.second_order


def cross_check(trainable: Trainable, batch: dict, scale: float, tol: float = 1e-4) -> float:
    """Debug: the meta-gradient of the tasks at once against one task at a time, same batch."""
    algo, model, grads = trainable.algorithm, trainable.model, []
    params = dict(model.named_parameters())
    for at_once in (0, 1):
        model.zero_grad(set_to_none=True)
        meta_backward(
            algo.task_losses, Eager(model, algo.second_order, at_once), params, batch, scale
        )
        grads.append(torch.cat([p.grad.flatten() for p in params.values()]))
    model.zero_grad(set_to_none=True)
    err = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max().clamp_min(1e-12)).item()
    if err > tol:
        raise TrainError(
            f"debug cross-check: the tasks at once and one at a time give meta-gradients "
            f"{err:.2e} apart (relative), over {tol}"
        )
    return err


class MetaStep:
    """The step of `plan`, built complete: its compute per algorithm variant, its reduction."""

    def __init__(self, trainable: Trainable, dist, plan: Plan, settings: StepSettings):
        self.trainable, self.dist, self.plan, self.s = trainable, dist, plan, settings
        self.model, self.algorithms = trainable.model, trainable.algorithms
        self.optimizer, self.schedule = trainable.optimizer, trainable.schedule
        self.params = dict(self.model.named_parameters())
        self.param_list = list(self.params.values())
        self.at_once = plan.local(settings.local_tasks)
        if plan.reduce == "exact":
            plan.check_world(dist.world, settings.meta_batch_size)
            self.reduction = reduce.Exact(
                dist, self.param_list, settings.meta_batch_size, plan.at_once
            )
        else:
            self.reduction = reduce.Fast(dist, self.param_list, settings.local_tasks)
        kind = Compiled if plan.compute == "compiled" else Eager
        self.computes = self.algorithms.map(
            lambda algo: kind(self.model, algo.second_order, self.at_once)
        )
        self.first = dist.rank * settings.local_tasks // self.at_once  # this rank's first chunk
        self.run = self._graphed if plan.compute == "graph" else self._eager
        # cache_enabled=False: autocast's weight cache cannot live across CUDA-graph replays
        self.amp = (
            torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
            if settings.bf16
            else contextlib.nullcontext()
        )
        self.graphs = {}  # the captured meta-step of each variant, on CUDA
        if settings.first_order_steps and trainable.second_order:
            log.say(
                f"derivative-order annealing: steps 1..{settings.first_order_steps} first order, "
                "then second order"
            )

    def _chunk_rng(self, step: int):
        """DropBlock's generator for each chunk, named by (seed, step, global chunk index): the same
        masks for a chunk whatever the world size. None when the backbone has no DropBlock."""
        if not getattr(self.model, "dropblock", 0):
            return None

        def rng(i: int) -> torch.Generator:
            named = [self.s.seed, 17, step, self.first + i]
            return torch.Generator().manual_seed(
                int(np.random.SeedSequence(named).generate_state(1)[0])
            )

        return rng

    def local(self, first_order: bool, batch: dict, step: int = 0) -> tuple:
        """This rank's share of the meta-gradient of `batch`, chunk by chunk into the reduction:
        (loss sum, accuracy sum, *the reduction's vectors)."""
        algo, compute = self.algorithms.at(first_order), self.computes.at(first_order)
        red = self.reduction
        rng, loss_sum, acc_sum = self._chunk_rng(step), 0.0, 0.0
        red.start()
        for i, chunk in enumerate(chunks(batch, self.at_once)):
            losses, accs, grads = compute(
                algo.task_losses, self.params, chunk, red.scale, rng(i) if rng else None
            )
            red.take(grads)
            loss_sum, acc_sum = loss_sum + losses.sum(), acc_sum + accuracy_sum(accs, chunk)
        return (loss_sum, acc_sum, *red.vectors())

    def _eager(self, variant: tuple, batch: dict, step: int) -> tuple:
        self.optimizer.zero_grad(set_to_none=True)
        return self.local(variant[0], batch, step)

    def _graphed(self, variant: tuple, batch: dict, step: int) -> tuple:
        """On CUDA: the graph overwrites .grad on every replay, no zeroing."""
        if variant not in self.graphs:
            self.graphs[variant] = Graphed(
                lambda b: self.local(variant[0], b), self.param_list, batch
            )
        return self.graphs[variant](batch)

    def __call__(self, step: int, batch: dict, votes) -> tuple[torch.Tensor, ...]:
        """Step `step` (0-based) on this rank's batch; `votes()` gives this rank's stop votes.
        Returns (loss sum, accuracy sum, gradient norm, votes over ranks)."""
        first_order = step < self.s.first_order_steps
        # what the algorithm adds to this step's batch rides in it (an input, like the episodes:
        # one captured graph serves every step)
        extras = self.algorithms.at(first_order).batch_extras(step, batch)
        batch = dict(batch, **extras) if extras else batch
        with anomaly_guard(step + 1, self.s.debug):
            if self.s.debug and step == 0:
                err = cross_check(self.trainable, batch, 1.0 / self.s.local_tasks)
                log.say(
                    "debug: tasks at once and one at a time agree (max relative difference "
                    f"{err:.1e})"
                )
            with self.amp:
                out = self.run((first_order, tuple(sorted(extras))), batch, step)
        agreed = self.reduction.reduce(out[2:], votes(), step + 1)
        if self.s.debug:
            check_finite(step + 1, out[0], self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.param_list, self.s.clip)
        self.optimizer.step()
        self.schedule.step()
        return out[0], out[1], grad_norm, agreed


def runner(trainable: Trainable, sample, n: int, device: torch.device, scale: float = 0.0):
    """run(size, compiled=False) -> size: one meta-backward of the first `size` tasks of
    `sample(n)` (the run's episodes, made at the first call) computed at once, eager or compiled
    (one compiled chunk per size, compiled at its first call), for the plan's measurement; nothing
    is left in .grad. `scale`: the step's chunk_scale (default 1/size), so that a compiled chunk
    measured here is the graph the step compiles again (found in inductor's cache)."""
    algo, params, made = trainable.algorithm, dict(trainable.model.named_parameters()), {}

    def run(size: int, compiled: bool = False) -> int:
        if not made:
            made["batch"] = {k: v.to(device) for k, v in sample(n).items()}
        chunk = {k: v[:size] for k, v in made["batch"].items()}
        if compiled and (size, "compiled") not in made:
            made[size, "compiled"] = Compiled(trainable.model, algo.second_order, size)
        compute = (
            made[size, "compiled"] if compiled else Eager(trainable.model, algo.second_order, size)
        )
        compute(algo.task_losses, params, chunk, scale or 1.0 / size)
        return size

    return run


def build(cfg, model: torch.nn.Module, dist, plan: Plan, local_tasks: int) -> MetaStep:
    """The MetaStep of `cfg` and `plan` on `model` (benchmarks and tests; the Trainer builds the
    Trainable first, since its checkpoint holds the plan)."""
    t, a = cfg.train, cfg.algo
    settings = StepSettings.of(t, a, cfg.seed, local_tasks, dist.device)
    ways = cfg.data.episode_shape("train")[0]
    return MetaStep(Trainable.of(t, a, ways, model, dist.device), dist, plan, settings)
