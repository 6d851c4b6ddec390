"""One meta-step, whatever runs it: `MetaStep(step, batch, votes)` computes this rank's share of
the meta-gradient with the algorithm variant of that step (derivative-order annealing: the first
`algo.first_order_steps` steps first order; MAML++'s multi-step loss weights of that step), under
autocast when asked, replayed as a CUDA graph or run eagerly, averages it over ranks (the
reduction also carries the stop votes), clips it and takes the Adam and schedule step. It
returns device tensors only: no host sync here.

`train.reduce=exact` (default): the global meta-batch is cut into chunks of `algo.tasks_per_chunk`
tasks (0: the largest chunk that 8 processes still split evenly, B/8 for a multiple of 8), each
chunk's gradient computed alone and the chunks summed by a fixed tree (metadist/exact.py), so the
weights are bit-identical for any world size that splits the chunks evenly. `fast`: each rank's
tasks in one graph (or its chunks accumulated), one all-reduce.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from functools import partial

import numpy as np
import torch

from metadist import exact
from metadist.algorithms import build as build_algorithm
from metadist.algorithms.core import meta_backward
from metadist.algorithms.maml import msl_weights
from metadist.config import Config, ConfigError
from metadist.cuda_graph import GraphedStep
from metadist.errors import MetadistError


class TrainError(MetadistError):
    pass


def lr_lambda(cfg: Config, total=None, hold: int = 0):
    """The meta learning-rate factor of a step: linear warm-up, then constant or cosine to 0 at
    step total() (default train.steps). hold: the cosine starts after this step (the budget
    schedule's probe; the factor before it cannot depend on the total it is about to fix)."""
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "cosine":
            start = max(t.warmup_steps, hold)
            if step < start:
                return 1.0
            span = max(1, (total() if total else t.steps) - start)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / span)))
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


EXACT_PROCESSES = 8     # exact mode's automatic chunk lets up to this many processes split a meta-batch


def chunk_size(reduce: str, tasks_per_chunk: int, local_tasks: int, meta_batch_size: int) -> int:
    """Tasks per chunk. Exact mode fixes it for every world size: 0 -> the largest divisor c of the
    meta-batch with at least EXACT_PROCESSES chunks (B/8 for a multiple of 8; 1 below 8 tasks), so
    1, 2, 4 and 8 processes give the same weights. Fast mode's 0: a rank's tasks in one graph."""
    if reduce == "exact":
        if tasks_per_chunk:
            return tasks_per_chunk
        return max([c for c in range(1, meta_batch_size + 1)
                    if meta_batch_size % c == 0 and meta_batch_size // c >= EXACT_PROCESSES] or [1])
    return tasks_per_chunk or local_tasks


class MetaStep:
    def __init__(self, cfg: Config, model: torch.nn.Module, dist, local_tasks: int, say=print,
                 image_shape: tuple[int, int, int] = (1, 28, 28)):
        t, device = cfg.train, dist.device
        self.cfg, self.model, self.dist, self.say = cfg, model, dist, say
        self.image_shape = tuple(image_shape)
        self.params = dict(model.named_parameters())
        self.param_list = list(self.params.values())
        self.algorithms = {fo: build_algorithm(cfg, model, first_order=fo) for fo in (False, True)}
        self.local_tasks = local_tasks
        self.exact = t.reduce == "exact"
        self.chunk = chunk_size(t.reduce, cfg.algo.tasks_per_chunk, local_tasks, t.meta_batch_size)
        if self.exact:
            if local_tasks % self.chunk:
                raise ConfigError(
                    f"train.reduce=exact: {local_tasks} tasks per process (train.meta_batch_size={t.meta_batch_size} over "
                    f"{dist.world}) do not split into chunks of algo.tasks_per_chunk={self.chunk}; choose a chunk size "
                    f"that divides {local_tasks}, fewer processes, or train.reduce=fast")
            chunks = t.meta_batch_size // self.chunk
            self.layout = exact.layout(chunks, dist.world)
            self.first_chunk = dist.rank * (chunks // dist.world)
            self.scale = 1.0 / t.meta_batch_size            # the same for every world size
            # each chunk's flat gradient carries 2 slots for the stop votes, padded to a multiple of
            # the world size so the all-to-all sends it as it is (zeros change no sum)
            self.n_grad = sum(p.numel() for p in self.param_list)
            self.extra = 2 + (-(self.n_grad + 2)) % dist.world
        else:
            self.scale = 1.0 / local_tasks                  # then averaged over ranks by the all-reduce
        self.strategy = None
        # on a GPU the fused Adam kernel (one launch for all tensors; eager and graph runs use the same)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=t.meta_lr, fused=device.type == "cuda" or None)
        self.total_steps = t.steps        # the budget schedule sets it once it has measured (train.py)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, lambda: self.total_steps, t.budget_probe if t.budget_schedule else 0))
        # cache_enabled=False: autocast's weight cache cannot live across CUDA-graph replays
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
                    if t.mixed_precision == "bf16" and device.type == "cuda" else contextlib.nullcontext())
        if t.cuda_graph == "on" and device.type != "cuda":
            raise ConfigError(f"train.cuda_graph=on needs a CUDA device (this process runs on {device})")
        # DropBlock draws its masks on the host each step: no captured graph then
        self.use_graph = device.type == "cuda" and not t.debug and t.cuda_graph != "off" and not cfg.model.dropblock
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
        self.backward = {fo: partial(self._backward, a) for fo, a in self.algorithms.items()}

    def _dropblock(self, step: int):
        """DropBlock's generator for each chunk, named by (seed, step, global chunk index): the same
        masks for a chunk whatever the world size. None when the backbone has no DropBlock."""
        if not getattr(self.model, "dropblock", 0):
            return None
        first = self.first_chunk if self.exact else self.dist.rank * self.local_tasks // self.chunk

        def on_chunk(i: int) -> None:
            seed = np.random.SeedSequence([self.cfg.seed, 17, step, first + i]).generate_state(1)[0]
            self.model.rng = torch.Generator().manual_seed(int(seed))
        return on_chunk

    def _backward(self, algo, batch: dict, step: int = 0) -> tuple:
        """(loss sum, accuracy sum) and, in exact mode, this rank's dyadic block sums of the chunk
        gradients (each with `extra` trailing slots: the stop votes, then padding)."""
        on_chunk = self._dropblock(step)
        try:
            if not self.exact:
                return meta_backward(algo.task_losses, self.model, self.params, batch, self.strategy, self.chunk,
                                     self.scale, algo.second_order, on_chunk=on_chunk)
            tree = exact.TreeSum(self.first_chunk)
            loss_sum, acc_sum = meta_backward(algo.task_losses, self.model, self.params, batch, self.strategy, self.chunk,
                                              self.scale, algo.second_order, tree=tree, extra=self.extra, on_chunk=on_chunk)
            return (loss_sum, acc_sum, *[v for _, _, v in tree.blocks()])
        finally:
            if on_chunk is not None:
                self.model.rng = None          # evaluation never drops

    def shape(self) -> dict:
        """What decides a chunk's speed (the strategy cache's key, with the machine)."""
        c, a, d = self.cfg, self.cfg.algo, self.cfg.data
        return {"model": dataclasses.asdict(c.model), "image": list(self.image_shape), "ways": d.ways, "shots": d.shots,
                "queries": d.queries, "algo": a.name, "second_order": self.second_order, "inner_steps": a.inner_steps,
                "learn_inner_lr": a.learn_inner_lr, "per_step_bn": a.per_step_bn, "tasks_per_chunk": self.chunk,
                "head_init": self.algorithms[False].train_inner.head_init,
                "device": self.dist.device.type}

    def chunk_runner(self, tasks: int = 4):
        """run(strategy) -> tasks: one meta-backward of up to `tasks` random tasks of this run's
        shape (the strategy measurement); the weights and their gradients are left as they were."""
        d, device = self.cfg.data, self.dist.device
        g = torch.Generator().manual_seed(0)
        n = min(tasks, self.chunk)
        batch = {"x_support": torch.rand(n, d.ways * d.shots, *self.image_shape, generator=g),
                 "y_support": torch.arange(d.ways).repeat_interleave(d.shots).expand(n, -1),
                 "x_query": torch.rand(n, d.ways * d.queries, *self.image_shape, generator=g),
                 "y_query": torch.arange(d.ways).repeat_interleave(d.queries).expand(n, -1)}
        batch = {k: v.to(device) for k, v in batch.items()}
        algo = self.algorithms[False]

        def run(strategy: str) -> int:
            meta_backward(algo.task_losses, self.model, self.params, batch, strategy, 0, 1.0 / n, algo.second_order)
            self.model.zero_grad(set_to_none=True)
            return n
        return run

    def _reduce(self, out: tuple, votes: torch.Tensor, step: int) -> torch.Tensor:
        """The meta-gradient into params' .grad (views of one flat buffer); returns the votes
        averaged (fast) or summed (exact) over ranks: > 0 means someone voted."""
        if not self.exact:
            return self.dist.mean_gradients(self.param_list, votes, step)
        vectors, n = out[2:], self.n_grad
        vectors[0][n:n + 2] = votes.to(vectors[0])     # this step's own buffer (or the graph's output): no copy
        mine = [(a, size, v) for (a, size), v in zip(self.layout[self.dist.rank], vectors)]
        flat = self.dist.exact_mean(mine, self.layout, step)
        for p, g in zip(self.param_list, torch.split(flat[:n], [p.numel() for p in self.param_list])):
            p.grad = g.view_as(p)
        return flat[n:n + 2]

    def __call__(self, step: int, batch: dict, votes) -> tuple[torch.Tensor, ...]:
        """Step `step` (0-based) on this rank's batch; `votes()` gives this rank's stop votes.
        Returns (loss sum, accuracy sum, gradient norm, votes over ranks)."""
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
                                  self.cfg.algo.tasks_per_chunk, 1.0 / self.local_tasks)
                self.say(f"debug: batched vs loop meta-gradient agree (max relative difference {err:.1e})")
            with self.amp:
                if self.use_graph:        # fast mode: the graph overwrites .grad on every replay, no zeroing
                    if variant not in self.graphs:
                        self.graphs[variant] = GraphedStep(lambda b: self.backward[first_order](batch=b),
                                                           self.param_list, batch)
                    out = self.graphs[variant](batch)
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    out = self.backward[first_order](batch=batch, step=step)
        agreed = self._reduce(out, votes(), step + 1)
        loss_sum, acc_sum = out[0], out[1]
        if debug:
            check_finite(step + 1, loss_sum, self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.param_list, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss_sum, acc_sum, grad_norm, agreed
