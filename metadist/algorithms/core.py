"""The one inner loop (`adapt`), the task forward of each strategy, and the meta-backward.

Strategies: `batched` runs a chunk of tasks as one folded network (model.tasks_forward), `loop`
runs tasks one at a time (the reference's way). Both give a forward(params, x) -> (T, n, ways)
where params carry a leading task dimension, so `adapt` and the algorithms never know which one
runs. Evaluation calls the same `adapt` with first_order=True on detached weights: no
second-order graph is ever built there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from metadist.model import ConvNet, is_lr, lr_key, tasks_forward

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Inner:
    """Inner-loop settings; variants of MAML are settings of the same loop."""
    steps: int
    lr: float
    first_order: bool = False
    adapt_names: tuple[str, ...] | None = None   # None = all parameters (ANIL: the head only)
    checkpoint: bool = False                      # recompute activations of each inner step in backward


def make_forward(model: ConvNet, strategy: str, second_order: bool = True) -> Forward:
    """forward(params, x, step=0): params[k] is (T, *shape), x is (T, n, C, H, W) -> logits (T, n, ways);
    `step` is the inner step (per-step BatchNorm weights).
    second_order=False lets the batched forward use the native batch-norm kernel (its double
    backward is never taken then)."""
    if strategy == "batched":
        return lambda p, x, step=0: tasks_forward(p, x, model.depth, native_norm=not second_order, step=step)
    if strategy == "loop":
        # one task at a time, like the reference; torch's fused batch-norm kernel is exact here
        # (its double backward is only wrong under vmap) and the fastest per-task choice
        def loop(p, x, step=0):
            if x.shape[0] == 1:          # meta-training's loop chunks are single tasks: no slicing, no cat
                return tasks_forward(p, x, model.depth, native_norm=True, step=step)
            return torch.cat([tasks_forward({k: v[t:t + 1] for k, v in p.items()}, x[t:t + 1], model.depth,
                                            native_norm=True, step=step) for t in range(x.shape[0])])
        return loop
    raise ValueError(f"unknown strategy {strategy!r}")


def per_task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each task: logits (T, n, ways), y (T, n) -> (T,)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def per_task_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).float().mean(1)


def adapted(params: Params, inner: Inner) -> tuple[str, ...]:
    """The parameters the inner loop updates: inner.adapt_names, else every weight (never the
    learned learning rates)."""
    return inner.adapt_names or tuple(k for k in params if not is_lr(k))


def step_lr(lr, weight: torch.Tensor, step: int):
    """The inner learning rate of one step: a float, or a learned rate (T, *shape) / per step (T, steps, ...)."""
    if isinstance(lr, torch.Tensor) and lr.dim() == weight.dim() + 1:
        return lr.select(1, min(step, lr.shape[1] - 1))
    return lr


def adapt(forward: Forward, params: Params, x_support: torch.Tensor, y_support: torch.Tensor, inner: Inner,
          trajectory: bool = False):
    """`inner.steps` SGD steps on each task's support loss; returns the fast weights (with
    trajectory=True, the list of fast weights after each step).

    Second order (first_order=False): the inner gradients stay in the graph (create_graph), so a
    meta-gradient flows through them. First order: the inner gradients are constants.
    Where params hold learned inner learning rates (`inner_lr.*`, model.lr_key) they replace
    `inner.lr`, per step where they have a step axis; the meta-gradient reaches them through the
    update. Step i's support forward uses step i's per-step BatchNorm weights, if any.
    """
    names = adapted(params, inner)
    lrs = {k: params.get(lr_key(k), inner.lr) for k in names}
    fast, path = dict(params), []
    for i in range(inner.steps):
        def support_loss(*ws):
            return per_task_loss(forward({**fast, **dict(zip(names, ws))}, x_support, i), y_support).sum()
        ws = [fast[k] for k in names]
        if inner.checkpoint and torch.is_grad_enabled():
            loss = checkpoint(support_loss, *ws, use_reentrant=False)
        else:
            loss = support_loss(*ws)
        # sum over tasks: each task's slice of the gradient is its own mean-loss gradient
        grads = torch.autograd.grad(loss, ws, create_graph=not inner.first_order)
        fast = dict(fast, **{k: w - step_lr(lrs[k], w, i) * g for k, w, g in zip(names, ws, grads)})
        path.append(fast)
    return path if trajectory else fast


def per_task(params: Params, tasks: int) -> Params:
    """Meta-parameters viewed once per task (gradients flow back to the shared tensors)."""
    return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}


def chunks(batch: dict, size: int):
    tasks = batch["x_support"].shape[0]
    size = size or tasks
    for s in range(0, tasks, size):
        yield {k: v[s:s + size] for k, v in batch.items() if isinstance(v, torch.Tensor)}


def meta_backward(task_losses, model: ConvNet, params: Params, batch: dict, strategy: str,
                  tasks_per_chunk: int, scale: float, second_order: bool = True, tree=None, extra: int = 0):
    """scale * d(sum of the tasks' losses)/d(params), chunk by chunk.

    `task_losses(forward, per_task_params, chunk) -> (losses (t,), accuracies (t,))`. Fast (tree
    None): accumulated into params' .grad; with the loop strategy every task is its own chunk (the
    reference's memory profile). Exact (tree: a metadist.exact.TreeSum): each chunk of
    `tasks_per_chunk` tasks gives its own flat gradient (`extra` zeros appended), pushed to the
    tree; nothing is accumulated, so a chunk's gradient never depends on the chunks before it.
    Returns the sums of loss and accuracy over the tasks (detached tensors; no host sync here).
    """
    forward = make_forward(model, strategy, second_order)
    size = 1 if strategy == "loop" and tree is None else tasks_per_chunk
    leaves = list(params.values())
    loss_sum = acc_sum = 0.0
    for chunk in chunks(batch, size):
        t = chunk["x_support"].shape[0]
        losses, accs = task_losses(forward, per_task(params, t), chunk)
        total = losses.sum() * scale
        if tree is None:
            total.backward()
        else:
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
            tree.push(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, leaves)]
                                + [leaves[0].new_zeros(extra)]))
        loss_sum = loss_sum + losses.detach().sum()
        acc_sum = acc_sum + accs.detach().sum()
    return loss_sum, acc_sum


def adapt_and_predict(model: ConvNet, params: Params, x_support, y_support, x_query, inner: Inner,
                      strategy: str = "batched") -> torch.Tensor:
    """Evaluation: adapt detached copies of the weights (first order, no meta-graph), then
    predict the query. Returns query logits (T, n, ways)."""
    forward = make_forward(model, strategy, second_order=False)
    T = x_support.shape[0]
    names = set(adapted(params, inner))
    fast = {k: v.detach().unsqueeze(0).repeat(T, *([1] * v.dim())).requires_grad_(k in names)
            for k, v in params.items()}
    with torch.enable_grad():
        fast = adapt(forward, fast, x_support, y_support, Inner(inner.steps, inner.lr, True, inner.adapt_names))
    with torch.no_grad():
        return forward({k: v.detach() for k, v in fast.items()}, x_query, max(0, inner.steps - 1))
