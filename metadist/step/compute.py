"""The compute: a chunk of tasks -> (losses, accuracies, gradients), one seam with its
implementations, chosen by the plan.

- `Eager`: the algorithm's task losses on the chunk (tasks at once: folded into one network; one
  task: the per-task loop's network, torch's fused BatchNorm), then `gradients`.
- `Compiled` (`algo.compile=on` on a CPU): the same computation, from the meta-parameters and the
  episodes to the losses, accuracies and meta-gradient (the inner loop's autograd.grad with
  create_graph and the outer one included), traced once per chunk shape into one ATen graph
  (make_fx follows autograd through both) and compiled by inductor, which fuses the memory-bound
  element-wise work (BatchNorm, ReLU, pooling and their double backward) into a few loops. About a
  minute per shape for Conv4 on 2 cores the first time; inductor's disk cache (in the per-machine
  cache: metadist.machine.inductor_cache) makes later runs take seconds. Its layout optimisation
  (convolutions in channels-last) is off: with it the float32 meta-gradient of Conv4 was 1e-4 to
  8e-3 (relative) from float64, against about 1e-6 without (tests/test_compiled.py: equal to the
  eager chunk in float64).
- `Graphed` (`algo.compile=on` on a GPU): a rank's whole meta-backward captured as one CUDA graph
  and replayed: a 5-way 1-shot step is hundreds of tiny kernels whose launches, not their work,
  take the time. The episodes are copied into static buffers before each replay.

`gradients` is the one place where losses become gradients.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from metadist.algorithms.core import make_forward, per_task, trim
from metadist.machine import inductor_cache


def gradients(losses: torch.Tensor, scale: float, params: list[torch.Tensor]) -> list:
    """d(scale * sum of the losses)/d(params), None where a weight gets no gradient (or does not
    require one)."""
    wrt = [p for p in params if p.requires_grad]
    got = iter(torch.autograd.grad(losses.sum() * scale, wrt, allow_unused=True))
    return [next(got) if p.requires_grad else None for p in params]


def one_at_a_time(at_once: int) -> bool:
    """Whether a chunk of `at_once` tasks runs the per-task loop's network (one task does)."""
    return at_once == 1


def chunks(batch: dict, size: int):
    """Chunks of `size` tasks (0: all), each cut to its own largest episode (trim)."""
    tasks = batch["x_support"].shape[0]
    size = size or tasks
    for s in range(0, tasks, size):
        yield trim({k: v[s : s + size] for k, v in batch.items() if isinstance(v, torch.Tensor)})


class Eager:
    """chunk(task_losses, params, chunk, scale, rng) -> (losses (t,), accuracies (t,), gradients
    of scale * the losses' sum in params' order)."""

    def __init__(self, model, second_order: bool, at_once: int = 0):
        self.model, self.second_order, self.at_once = model, second_order, at_once
        self.one_at_a_time = one_at_a_time(at_once)

    def __call__(self, task_losses, params: dict, chunk: dict, scale: float, rng=None):
        forward = make_forward(self.model, self.one_at_a_time, self.second_order, rng)
        losses, accs = task_losses(forward, per_task(params, chunk["x_support"].shape[0]), chunk)
        return losses.detach(), accs.detach(), gradients(losses, scale, list(params.values()))


class Compiled:
    """Eager's computation compiled by inductor, one graph per chunk shape and algorithm variant,
    built at its first use (see the module's docstring)."""

    def __init__(self, model, second_order: bool, at_once: int = 0):
        self.model, self.second_order, self.at_once = model, second_order, at_once
        self.graphs = {}

    def __call__(self, task_losses, params: dict, chunk: dict, scale: float, rng=None):
        keys = sorted(k for k, v in chunk.items() if isinstance(v, torch.Tensor))
        # contiguous: the graph is traced for, and fed, one memory layout
        inputs = [p.detach() for p in params.values()] + [chunk[k].contiguous() for k in keys]
        sig = (
            id(getattr(task_losses, "__self__", task_losses)),
            scale,
            tuple(keys),
            tuple((tuple(v.shape), v.dtype, v.device.type) for v in inputs),
            tuple(p.requires_grad for p in params.values()),
        )
        if sig not in self.graphs:
            self.graphs[sig] = self._build(task_losses, params, keys, scale, inputs)
        run, used = self.graphs[sig]
        out = iter(run(*inputs))
        losses, accs = next(out), next(out)
        return losses, accs, [next(out) if u else None for u in used]

    def _build(self, task_losses, params, keys, scale, inputs):
        """(compiled callable, which params get a gradient)."""
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        from torch.fx.experimental.proxy_tensor import make_fx

        # inductor's artefacts in the per-machine cache, keyed by what changes the kernels, where
        # the user has not chosen a folder (torch sets its default into the environment itself)
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (
            None,
            os.path.abspath(default_cache_dir()),
        ):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache())

        names, grad = list(params), [p.requires_grad for p in params.values()]
        eager, used = Eager(self.model, self.second_order, self.at_once), []

        def step(*args):
            ps = {k: v.requires_grad_(g) for k, v, g in zip(names, args, grad)}
            losses, accs, got = eager(task_losses, ps, dict(zip(keys, args[len(names) :])), scale)
            used[:] = [g is not None for g in got]
            return (losses, accs, *[g for g in got if g is not None])

        graph = make_fx(step)(*[v.clone() for v in inputs])
        with inductor_config.patch(layout_optimization=False):
            run = compile_fx(graph, inputs)
        return run, list(used)


class Graphed:
    """fn(batch) -> outputs, captured as a CUDA graph and replayed (see the module's docstring).
    fn must leave its gradients in params' .grad, which belong to the graph and are overwritten
    (not accumulated) by every replay: the caller must not set them to None between steps.
    Parameters are updated in place by the optimizer, so the graph reads the current weights."""

    def __init__(
        self, fn: Callable[[dict], tuple], params: list[torch.Tensor], example: dict, warmup=3
    ):
        self.params = params
        self.static = {k: v.detach().clone() for k, v in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (cuDNN plans, allocator)
            for _ in range(warmup):
                self._clear()
                fn(self.static)
        torch.cuda.current_stream().wait_stream(side)
        self._clear()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.static)
        self.grads = [p.grad for p in params]

    def _clear(self):
        for p in self.params:
            p.grad = None

    def __call__(self, batch: dict):
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        for p, g in zip(self.params, self.grads):  # re-attach, should anyone have replaced them
            p.grad = g
        self.graph.replay()
        return self.out


def accuracy_sum(accs: torch.Tensor, chunk: dict) -> torch.Tensor:
    """The chunk's accuracy sum; where the chunk says each task's source (one-hot (t, sources)),
    the total, then each source's."""
    if "source" in chunk:
        return torch.cat([accs.sum()[None], accs @ chunk["source"].to(accs)])
    return accs.sum()


def meta_backward(task_losses, compute, params: dict, batch: dict, scale: float = 1.0):
    """scale * d(sum of the tasks' losses)/d(params), accumulated into params' .grad, chunk by
    chunk of `compute.at_once` tasks through `compute` (an Eager or a Compiled): what benchmarks,
    tests and the debug cross-check run. Returns the sums of loss and accuracy over the tasks."""
    leaves, loss_sum, acc_sum = list(params.values()), 0.0, 0.0
    for chunk in chunks(batch, compute.at_once):
        losses, accs, grads = compute(task_losses, params, chunk, scale)
        for p, g in zip(leaves, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        loss_sum, acc_sum = loss_sum + losses.sum(), acc_sum + accuracy_sum(accs, chunk)
    return loss_sum, acc_sum


def sample_chunk(episode: tuple[int, int, int], image_shape: tuple, tasks: int) -> dict:
    """`tasks` random fixed episodes (ways, shots, queries) of `image_shape`: what a chunk of the
    run computes on, for the plan's measurement."""
    ways, shots, queries = episode
    g = torch.Generator().manual_seed(0)
    return {
        "x_support": torch.rand(tasks, ways * shots, *image_shape, generator=g),
        "y_support": torch.arange(ways).repeat_interleave(shots).expand(tasks, -1),
        "x_query": torch.rand(tasks, ways * queries, *image_shape, generator=g),
        "y_query": torch.arange(ways).repeat_interleave(queries).expand(tasks, -1),
    }
