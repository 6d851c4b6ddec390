"""One meta-step, whatever runs it: `MetaStep(step, batch, votes)` computes this rank's share of
the meta-gradient with the algorithm variant of that step (derivative-order annealing: the first
`algo.first_order_steps` steps first order; MAML++'s multi-step loss weights of that step), under autocast when asked, replayed as a CUDA graph
or run eagerly, averages it over ranks (one all-reduce that also carries the stop votes), clips
it and takes the Adam and schedule step. It returns device tensors only: no host sync here.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial

import torch

from metadist.algorithms import build as build_algorithm, resolve_strategy
from metadist.algorithms.core import meta_backward
from metadist.algorithms.maml import msl_weights
from metadist.config import Config, ConfigError
from metadist.cuda_graph import GraphedStep
from metadist.errors import MetadistError


class TrainError(MetadistError):
    pass


def lr_lambda(cfg: Config):
    """The meta learning-rate factor of a step: linear warm-up, then constant or cosine to 0."""
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "cosine":
            span = max(1, t.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - t.warmup_steps) / span)))
        return 1.0
    return f


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
        raise TrainError(f"step {step}: non-finite value in the meta-backward: {str(e).splitlines()[0]}") from None


def cross_check(algo, model, params, batch, chunk: int, scale: float, tol: float = 1e-4) -> float:
    """Debug: the batched strategy's meta-gradient against the per-task loop's, same batch."""
    grads = []
    for strategy in ("batched", "loop"):
        model.zero_grad(set_to_none=True)
        meta_backward(algo.task_losses, model, params, batch, strategy, chunk, scale, algo.second_order)
        grads.append(torch.cat([p.grad.flatten() for p in params.values()]))
    model.zero_grad(set_to_none=True)
    err = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max().clamp_min(1e-12)).item()
    if err > tol:
        raise TrainError(f"debug cross-check: batched and loop meta-gradients differ by {err:.2e} (relative), over {tol}")
    return err


class MetaStep:
    def __init__(self, cfg: Config, model: torch.nn.Module, dist, local_tasks: int, say=print):
        t, d, device = cfg.train, cfg.data, dist.device
        self.cfg, self.model, self.dist, self.say = cfg, model, dist, say
        self.params = dict(model.named_parameters())
        self.param_list = list(self.params.values())
        self.algorithms = {fo: build_algorithm(cfg, model, first_order=fo) for fo in (False, True)}
        self.local_tasks = local_tasks
        self.use_strategy(resolve_strategy(cfg.algo.strategy, device, d.ways * (d.shots + d.queries), self.second_order))
        # on a GPU the fused Adam kernel (one launch for all tensors; eager and graph runs use the same)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=t.meta_lr, fused=device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        # cache_enabled=False: autocast's weight cache cannot live across CUDA-graph replays
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
                    if t.mixed_precision == "bf16" and device.type == "cuda" else contextlib.nullcontext())
        if t.cuda_graph == "on" and device.type != "cuda":
            raise ConfigError(f"train.cuda_graph=on needs a CUDA device (this process runs on {device})")
        self.use_graph = device.type == "cuda" and not t.debug and t.cuda_graph != "off"
        self.graphs = {}     # the captured meta-step of each variant, on CUDA
        self.clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        if cfg.algo.first_order_steps and self.algorithms[False].second_order:
            say(f"derivative-order annealing: steps 1..{cfg.algo.first_order_steps} first order, then second order")

    @property
    def second_order(self) -> bool:
        return self.algorithms[False].second_order

    def use_strategy(self, strategy: str) -> None:
        """How this rank's tasks run (batched | loop); set before the first step."""
        self.strategy = strategy
        self.backward = {fo: partial(meta_backward, a.task_losses, self.model, self.params, strategy=strategy,
                                     tasks_per_chunk=self.cfg.algo.tasks_per_chunk, scale=1.0 / self.local_tasks,
                                     second_order=a.second_order) for fo, a in self.algorithms.items()}

    def measure_strategies(self, rounds: int = 2, tasks: int = 4) -> dict[str, float]:
        """tasks/s of each strategy on a random batch of this run's shape (up to `tasks` tasks),
        interleaved, best of `rounds`; the weights and their gradients are left as they were."""
        import time
        d, device = self.cfg.data, self.dist.device
        g = torch.Generator().manual_seed(0)
        n = min(tasks, self.local_tasks)
        batch = {"x_support": torch.rand(n, d.ways * d.shots, 1, 28, 28, generator=g),
                 "y_support": torch.arange(d.ways).repeat_interleave(d.shots).expand(n, -1),
                 "x_query": torch.rand(n, d.ways * d.queries, 1, 28, 28, generator=g),
                 "y_query": torch.arange(d.ways).repeat_interleave(d.queries).expand(n, -1)}
        batch = {k: v.to(device) for k, v in batch.items()}
        algo = self.algorithms[False]
        best = {"batched": 0.0, "loop": 0.0}
        for r in range(rounds + 1):
            for strategy in best:
                t = time.perf_counter()
                meta_backward(algo.task_losses, self.model, self.params, batch, strategy, 0, 1.0 / n, algo.second_order)
                if r:                                   # round 0 only warms up
                    best[strategy] = max(best[strategy], n / (time.perf_counter() - t))
                self.model.zero_grad(set_to_none=True)
        return best

    def __call__(self, step: int, batch: dict, votes) -> tuple[torch.Tensor, ...]:
        """Step `step` (0-based) on this rank's batch; `votes()` gives this rank's stop votes.
        Returns (loss sum, accuracy sum, gradient norm, votes averaged over ranks)."""
        debug, a = self.cfg.train.debug, self.cfg.algo
        first_order = step < a.first_order_steps
        msl = step < a.multi_step_loss and a.inner_steps > 1
        if msl:      # the weights are an input, like the episodes: one captured graph serves every step
            w = msl_weights(step, a.inner_steps, a.multi_step_loss).to(batch["x_support"])
            batch = dict(batch, msl_weights=w.expand(batch["x_support"].shape[0], -1))
        variant = (first_order, msl)
        with anomaly_guard(step + 1, debug):
            if debug and step == 0:
                err = cross_check(self.algorithms[first_order], self.model, self.params, batch,
                                  self.cfg.algo.tasks_per_chunk, self.backward[first_order].keywords["scale"])
                self.say(f"debug: batched vs loop meta-gradient agree (max relative difference {err:.1e})")
            with self.amp:
                if self.use_graph:        # the graph overwrites .grad on every replay: no zeroing
                    if variant not in self.graphs:
                        self.graphs[variant] = GraphedStep(lambda b: self.backward[first_order](batch=b),
                                                           self.param_list, batch)
                    loss_sum, acc_sum = self.graphs[variant](batch)
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss_sum, acc_sum = self.backward[first_order](batch=batch)
        agreed = self.dist.mean_gradients(self.param_list, votes(), step + 1)
        if debug:
            check_finite(step + 1, loss_sum, self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.param_list, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss_sum, acc_sum, grad_norm, agreed
