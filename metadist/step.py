"""One meta-step, whatever runs it: `MetaStep(step, batch, votes)` reads top to bottom: adapt and
query losses (the algorithm variant of that step: derivative-order annealing's first
`algo.first_order_steps` steps first order; MAML++'s multi-step loss weights of that step), the
meta-backward, the reduction over ranks (which also carries the stop votes), clipping, Adam and
the schedule. Two small pieces are swapped, not branched on: the reduction (`ExactReduction`,
`FastReduction`) and the runner (eager, or replayed as a CUDA graph). It returns device tensors
only: no host sync here.

`train.reduce=exact` (default): gradients summed by a fixed tree over the global meta-batch
(metadist/exact.py), so the weights are bit-identical for any world size. Its leaves are the
tasks, each task's gradient taken from its rank's tasks computed as groups of `algo.tasks_per_chunk`
(0: all of them) where this machine's kernels give a task the same bits in any group
(metadist.strategy.exact_grouping; as fast as `fast`); or every task alone (the loop strategy);
else chunks of `algo.tasks_per_chunk` tasks (0: B/8, what 8 processes still split evenly), each
computed alone. `fast`: each rank's tasks in one graph (or its chunks accumulated), one
all-reduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from metadist import algorithms, exact
from metadist.algorithms.core import Chunking, meta_backward
from metadist.algorithms.maml import msl_weights
from metadist.compiled import CompiledChunks
from metadist.config import ConfigError
from metadist.cuda_graph import GraphedStep
from metadist.errors import MetadistError
from metadist.schedule import Schedule


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


# exact mode's automatic chunk lets up to this many processes split a meta-batch
VOTES = 3  # the stop votes that ride the reduction: time, signal, a shard changed (train.StopVotes)
EXACT_PROCESSES = 8


def group_sizes(meta_batch_size: int, tasks_per_chunk: int) -> list[int]:
    """Every group size exact mode's per-task leaves may compute at some world size: a rank's
    share L = B / W for every W dividing B, in groups of algo.tasks_per_chunk (0: all L), and the
    remainder group. Checking them all makes the choice the same at every world size."""
    sizes = set()
    for world in range(1, meta_batch_size + 1):
        if meta_batch_size % world == 0:
            local = meta_batch_size // world
            sizes.add(min(tasks_per_chunk or local, local))
            if tasks_per_chunk and local % tasks_per_chunk:
                sizes.add(local % tasks_per_chunk)
    return sorted(sizes)


def chunk_size(reduce: str, tasks_per_chunk: int, local_tasks: int, meta_batch_size: int) -> int:
    """Tasks per chunk. Exact mode fixes it for every world size: 0 -> the largest divisor c of the
    meta-batch with at least EXACT_PROCESSES chunks (B/8 for a multiple of 8; 1 below 8 tasks), so
    1, 2, 4 and 8 processes give the same weights. Fast mode's 0: a rank's tasks in one graph."""
    if reduce == "exact":
        if tasks_per_chunk:
            return tasks_per_chunk
        return max(
            [
                c
                for c in range(1, meta_batch_size + 1)
                if meta_batch_size % c == 0 and meta_batch_size // c >= EXACT_PROCESSES
            ]
            or [1]
        )
    return tasks_per_chunk or local_tasks


@dataclass(frozen=True)
class StepSettings:
    """What a meta-step does besides the algorithm: the reduction (exact | fast) and its chunk, the
    global and local task counts, clipping, the MAML++ schedules (first-order steps, multi-step
    loss over `inner_steps`), the seed of random layers, debug checks, bf16 autocast and the CUDA
    graph. `StepSettings.of(cfg, local_tasks, device)` builds it from a config."""

    reduce: str = "exact"
    chunk: int = 1
    group: int = 1  # exact mode with per-task gradients: tasks computed at once
    meta_batch_size: int = 1
    local_tasks: int = 1
    clip: float = math.inf
    first_order_steps: int = 0
    multi_step_loss: int = 0
    inner_steps: int = 1
    seed: int = 0
    debug: bool = False
    bf16: bool = False
    graph: bool = False
    compile: bool = False  # algo.compile=on (metadist.compiled)

    @classmethod
    def of(cls, cfg, local_tasks: int, device: torch.device) -> StepSettings:
        t, a = cfg.train, cfg.algo
        if t.cuda_graph == "on" and device.type != "cuda":
            raise ConfigError(
                f"train.cuda_graph=on needs a CUDA device (this process runs on {device})"
            )
        if a.compile == "on" and device.type != "cpu":
            raise ConfigError(
                f"algo.compile=on compiles the meta-step for a CPU; on {device} the CUDA graph "
                "(train.cuda_graph) does that job: use algo.compile=off"
            )
        return cls(
            reduce=t.reduce,
            chunk=chunk_size(t.reduce, a.tasks_per_chunk, local_tasks, t.meta_batch_size),
            group=min(a.tasks_per_chunk or local_tasks, local_tasks),
            meta_batch_size=t.meta_batch_size,
            local_tasks=local_tasks,
            clip=t.grad_clip if t.grad_clip > 0 else math.inf,
            first_order_steps=a.first_order_steps,
            multi_step_loss=a.multi_step_loss,
            inner_steps=a.inner_steps,
            seed=cfg.seed,
            debug=t.debug,
            bf16=t.mixed_precision == "bf16" and device.type == "cuda",
            # DropBlock draws its masks on the host each step, and variable episodes (or many
            # sources) change shape every step: no captured graph then
            graph=device.type == "cuda"
            and not t.debug
            and t.cuda_graph != "off"
            and not cfg.model.dropblock
            and cfg.data.episode == "fixed"
            and not cfg.data.sources,
            compile=a.compile == "on",
        )


class FastReduction:
    """Each rank's tasks in one graph (or its chunks accumulated into .grad), then one all-reduce
    whose float32 sum order depends on the world size."""

    def __init__(self, s: StepSettings, dist, params: list[torch.Tensor]):
        self.dist, self.params, self.chunk = dist, params, s.chunk
        # then averaged over ranks by the all-reduce
        self.scale = 1.0 / s.local_tasks
        self.first_chunk = dist.rank * s.local_tasks // s.chunk

    def backward(self, run, rng) -> tuple:
        """(loss sum, accuracy sum); the gradient accumulated in .grad."""
        return run(Chunking(self.chunk, self.scale, rng=rng))

    def reduce(self, out: tuple, votes: torch.Tensor, step: int) -> torch.Tensor:
        """The meta-gradient averaged into .grad; the votes averaged over ranks (> 0: someone
        voted)."""
        return self.dist.mean_gradients(self.params, votes, step)


class ExactReduction:
    """Chunk gradients summed by the fixed dyadic tree over global chunk indices: bit-identical for
    any world size that splits the chunks evenly (metadist/exact.py)."""

    def __init__(self, s: StepSettings, dist, params: list[torch.Tensor]):
        if s.local_tasks % s.chunk:
            raise ConfigError(
                f"train.reduce=exact: {s.local_tasks} tasks per process "
                f"(train.meta_batch_size={s.meta_batch_size} "
                f"over {dist.world}) do not split into chunks of algo.tasks_per_chunk={s.chunk}; "
                "choose a chunk size "
                f"that divides {s.local_tasks}, fewer processes, or train.reduce=fast"
            )
        self.dist, self.params, self.s, self.per_task = dist, params, s, False
        self.leaves(s.chunk)
        self.scale = 1.0 / s.meta_batch_size  # the same for every world size
        # each chunk's flat gradient carries VOTES slots for the stop votes, padded to a multiple of
        # the world size so the all-to-all sends it as it is (zeros change no sum)
        self.n_grad = sum(p.numel() for p in params)
        self.extra = VOTES + (-(self.n_grad + VOTES)) % dist.world

    def leaves(self, chunk: int) -> None:
        """The tree's leaves: chunks of `chunk` tasks over the global meta-batch."""
        self.chunk, chunks = chunk, self.s.meta_batch_size // chunk
        self.layout = exact.layout(chunks, self.dist.world)
        self.first_chunk = self.dist.rank * (chunks // self.dist.world)

    def use(self, strategy: str, per_task: bool) -> None:
        """The tree's leaves. per_task: every task is a leaf, its gradient taken from a group of
        s.group tasks computed at once (metadist.strategy.exact_grouping says where that is
        exact). The loop: every task is a leaf, computed alone as the loop always does. Else
        chunks of s.chunk tasks, each computed alone."""
        self.per_task = per_task
        self.leaves(1 if per_task or strategy == "loop" else self.s.chunk)

    def backward(self, run, rng) -> tuple:
        """(loss sum, accuracy sum, this rank's dyadic block sums of the chunk gradients)."""
        tree = exact.TreeSum(self.first_chunk)
        size = self.s.group if self.per_task else self.chunk
        loss_sum, acc_sum = run(Chunking(size, self.scale, tree, self.extra, rng, self.per_task))
        return (loss_sum, acc_sum, *[v for _, _, v in tree.blocks()])

    def reduce(self, out: tuple, votes: torch.Tensor, step: int) -> torch.Tensor:
        """The meta-gradient into params' .grad (views of one flat buffer); the votes summed over
        ranks."""
        vectors, n = out[2:], self.n_grad
        # this step's own buffer (or the graph's output): no copy
        vectors[0][n : n + VOTES] = votes.to(vectors[0])
        mine = [(a, size, v) for (a, size), v in zip(self.layout[self.dist.rank], vectors)]
        flat = self.dist.exact_mean(mine, self.layout, step)
        for p, g in zip(self.params, torch.split(flat[:n], [p.numel() for p in self.params])):
            p.grad = g.view_as(p)
        return flat[n : n + VOTES]


def cross_check(algo, model, params, batch, chunk: int, scale: float, tol: float = 1e-4) -> float:
    """Debug: the batched strategy's meta-gradient against the per-task loop's, same batch."""
    grads = []
    for strategy in ("batched", "loop"):
        model.zero_grad(set_to_none=True)
        meta_backward(
            algo.task_losses,
            model,
            params,
            batch,
            strategy,
            Chunking(chunk, scale),
            algo.second_order,
        )
        grads.append(torch.cat([p.grad.flatten() for p in params.values()]))
    model.zero_grad(set_to_none=True)
    err = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max().clamp_min(1e-12)).item()
    if err > tol:
        raise TrainError(
            f"debug cross-check: batched and loop meta-gradients differ by {err:.2e} (relative), "
            f"over {tol}"
        )
    return err


class MetaStep:
    """algorithms: {first_order: Algorithm} (the variants derivative-order annealing switches
    between); optimizer and schedule: what the step takes after the reduction."""

    def __init__(
        self,
        model: torch.nn.Module,
        algorithms: dict,
        dist,
        settings: StepSettings,
        optimizer,
        schedule,
        say=print,
    ):
        self.model, self.algorithms, self.dist, self.s, self.say = (
            model,
            algorithms,
            dist,
            settings,
            say,
        )
        self.optimizer, self.schedule = optimizer, schedule
        self.params = dict(model.named_parameters())
        self.param_list = list(self.params.values())
        self.reduction = (ExactReduction if settings.reduce == "exact" else FastReduction)(
            settings, dist, self.param_list
        )
        self.run = self._graphed if settings.graph else self._eager
        self.strategy = None
        # cache_enabled=False: autocast's weight cache cannot live across CUDA-graph replays
        self.amp = (
            torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
            if settings.bf16
            else contextlib.nullcontext()
        )
        self.graphs = {}  # the captured meta-step of each variant, on CUDA
        self.compiled = CompiledChunks() if settings.compile else None
        if settings.first_order_steps and self.second_order:
            say(
                f"derivative-order annealing: steps 1..{settings.first_order_steps} first order, "
                "then second order"
            )

    @property
    def chunk(self) -> int:
        return self.s.chunk

    @property
    def second_order(self) -> bool:
        return self.algorithms[False].second_order

    def use_strategy(self, strategy: str, per_task: bool = False, at_once: int = 0) -> None:
        """How this rank's tasks run (batched | loop); in exact mode, whether each task's gradient
        is a leaf of the tree (see ExactReduction.use); `at_once` (0: the settings' own): the
        batched strategy's tasks computed at once, the fast mode's chunk and the per-task leaves'
        group (metadist.strategy measures it); set before the first step."""
        self.strategy = strategy
        if at_once:
            s = self.s
            size = min(at_once, s.local_tasks)
            self.s = dataclasses.replace(
                s, group=size, chunk=size if s.reduce == "fast" else s.chunk
            )
            self.reduction = type(self.reduction)(self.s, self.dist, self.param_list)
        if isinstance(self.reduction, ExactReduction):
            self.reduction.use(strategy, per_task)

    @property
    def per_task(self) -> bool:
        return getattr(self.reduction, "per_task", False)

    @property
    def leaf(self) -> int:
        """Tasks per leaf of the exact tree (per chunk computed alone), or per chunk in fast
        mode."""
        return self.reduction.chunk

    def _chunk_rng(self, step: int):
        """DropBlock's generator for each chunk, named by (seed, step, global chunk index): the same
        masks for a chunk whatever the world size. None when the backbone has no DropBlock."""
        if not getattr(self.model, "dropblock", 0):
            return None
        first = self.reduction.first_chunk

        def rng(i: int) -> torch.Generator:
            seed = np.random.SeedSequence([self.s.seed, 17, step, first + i]).generate_state(1)[0]
            return torch.Generator().manual_seed(int(seed))

        return rng

    def backward(self, first_order: bool, batch: dict, step: int = 0) -> tuple:
        """This rank's share of the meta-gradient of `batch` (see the reduction's backward)."""
        algo = self.algorithms[first_order]

        def run(cut: Chunking):
            if self.compiled is not None and not cut.per_task:
                cut = dataclasses.replace(cut, compiled=self.compiled)
            return meta_backward(
                algo.task_losses,
                self.model,
                self.params,
                batch,
                self.strategy,
                cut,
                algo.second_order,
            )

        return self.reduction.backward(run, self._chunk_rng(step))

    def _eager(self, variant: tuple, batch: dict, step: int) -> tuple:
        self.optimizer.zero_grad(set_to_none=True)
        return self.backward(variant[0], batch, step)

    def _graphed(self, variant: tuple, batch: dict, step: int) -> tuple:
        """Fast mode on CUDA: the graph overwrites .grad on every replay, no zeroing."""
        if variant not in self.graphs:
            self.graphs[variant] = GraphedStep(
                lambda b: self.backward(variant[0], b), self.param_list, batch
            )
        return self.graphs[variant](batch)

    def _with_msl(self, step: int, batch: dict) -> tuple[dict, bool]:
        """MAML++'s multi-step loss weights of this step ride in the batch (an input, like the
        episodes: one captured graph serves every step)."""
        s = self.s
        if not (step < s.multi_step_loss and s.inner_steps > 1):
            return batch, False
        w = msl_weights(step, s.inner_steps, s.multi_step_loss).to(batch["x_support"])
        return dict(batch, msl_weights=w.expand(batch["x_support"].shape[0], -1)), True

    def __call__(self, step: int, batch: dict, votes) -> tuple[torch.Tensor, ...]:
        """Step `step` (0-based) on this rank's batch; `votes()` gives this rank's stop votes.
        Returns (loss sum, accuracy sum, gradient norm, votes over ranks)."""
        first_order = step < self.s.first_order_steps
        batch, msl = self._with_msl(step, batch)
        with anomaly_guard(step + 1, self.s.debug):
            if self.s.debug and step == 0:
                err = cross_check(
                    self.algorithms[first_order],
                    self.model,
                    self.params,
                    batch,
                    self.s.chunk,
                    1.0 / self.s.local_tasks,
                )
                self.say(
                    "debug: batched vs loop meta-gradient agree (max relative difference "
                    f"{err:.1e})"
                )
            with self.amp:
                out = self.run((first_order, msl), batch, step)
        agreed = self.reduction.reduce(out, votes(), step + 1)
        if self.s.debug:
            check_finite(step + 1, out[0], self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.param_list, self.s.clip)
        self.optimizer.step()
        self.schedule.step()
        return out[0], out[1], grad_norm, agreed

    def chunk_runner(self, batch: dict):
        """run(strategy, size) -> tasks: one meta-backward of the first `size` tasks of `batch`
        (tasks of this run's shape: see sample_chunk) computed at once, for the strategy
        measurement; the weights and their gradients are left as they were."""
        batch = {k: v.to(self.dist.device) for k, v in batch.items()}
        algo = self.algorithms[False]

        def run(strategy: str, size: int) -> int:
            chunk = {k: v[:size] for k, v in batch.items()}
            cut = Chunking(0, 1.0 / size)
            meta_backward(
                algo.task_losses, self.model, self.params, chunk, strategy, cut, algo.second_order
            )
            self.model.zero_grad(set_to_none=True)
            return size

        return run


def sample_chunk(episode: tuple[int, int, int], image_shape: tuple, tasks: int) -> dict:
    """`tasks` random fixed episodes (ways, shots, queries) of `image_shape`: what a chunk of the
    run computes on, for the strategy measurement."""
    ways, shots, queries = episode
    g = torch.Generator().manual_seed(0)
    return {
        "x_support": torch.rand(tasks, ways * shots, *image_shape, generator=g),
        "y_support": torch.arange(ways).repeat_interleave(shots).expand(tasks, -1),
        "x_query": torch.rand(tasks, ways * queries, *image_shape, generator=g),
        "y_query": torch.arange(ways).repeat_interleave(queries).expand(tasks, -1),
    }


def from_config(cfg, model: torch.nn.Module, dist, local_tasks: int, say=print) -> MetaStep:
    """The meta-step a config describes: Adam at train.meta_lr (fused on a GPU: one launch for all
    tensors), its Schedule, the algorithm in both derivative orders, the step settings."""
    t = cfg.train
    optimizer = torch.optim.Adam(
        model.parameters(), lr=t.meta_lr, fused=dist.device.type == "cuda" or None
    )
    schedule = Schedule(
        optimizer, t.steps, t.schedule, t.warmup_steps, t.budget_probe if t.budget_schedule else 0
    )
    cls = algorithms.get(cfg.algo)
    variants = {
        fo: cls.build(cfg.algo, model, cfg.data.ways, first_order=fo) for fo in (False, True)
    }
    return MetaStep(
        model,
        variants,
        dist,
        StepSettings.of(cfg, local_tasks, dist.device),
        optimizer,
        schedule,
        say,
    )


def group_runner(step: MetaStep, batch: dict):
    """grads(size) -> (tasks, n): each task's gradient of `batch` (a sample of the run's episodes)
    computed in groups of `size` as exact mode's per-task leaves are, for
    metadist.strategy.exact_grouping; the weights and their gradients are left as they were."""
    batch = {k: v.to(step.dist.device) for k, v in batch.items()}
    algo = step.algorithms[False]

    class Rows(list):
        push = list.append

    def grads(size: int) -> torch.Tensor:
        rows = Rows()
        cut = Chunking(size, 1.0, rows, 0, None, True)
        meta_backward(
            algo.task_losses, step.model, step.params, batch, "batched", cut, algo.second_order
        )
        return torch.stack(rows)

    return grads
