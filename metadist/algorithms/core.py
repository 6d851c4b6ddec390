"""The one inner loop (`adapt`), the task forward, the per-task losses and accuracies: what every
algorithm's losses are made of (the meta-backward that takes their gradients is
metadist/step/compute.py's).

Forwards: a chunk of tasks at once, as one folded network (the backbone's tasks_forward), or
one task at a time (`one_at_a_time`: the reference's way). Both give a Forward:
forward(params, x) -> logits (T, n, ways) and forward.features(params, x) -> (T, n, F), where
params carry a leading task dimension, so `adapt` and the algorithms never know which one runs.
Evaluation calls the same `adapt` with first_order=True on detached weights: no second-order
graph is ever built there.

The head each task starts from (`Inner.head_init`): `learned` (MAML: the meta-learned head),
`zero` (every class starts at 0), `shared` (UNICORN-MAML: one learned row and bias, copied to every
class, so a task's outcome does not depend on how its classes are numbered), `proto` (Proto-MAML:
weights 2 c_k and bias -|c_k|^2 from the class prototypes c_k of the support features, where a
prototypical network ends). The same in training and evaluation. The proto head is a function
of the body's weights; the inner loop treats it as a parameter of its own (its gradients are
partial derivatives, the head held fixed, in both orders), and the meta-gradient flows through
the prototypes into the body.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from metadist.models import Backbone, is_lr, lr_key

Params = dict[str, torch.Tensor]
HEAD_INITS = ("learned", "zero", "shared", "proto")


@dataclass(frozen=True)
class Inner:
    """Inner-loop settings; variants of MAML are settings of the same loop."""

    steps: int
    lr: float
    first_order: bool = False
    adapt_names: tuple[str, ...] | None = None  # None = all parameters (ANIL: the head only)
    # recompute activations of each inner step in backward
    checkpoint: bool = False
    # the head a task starts from (see the module's docstring)
    head_init: str = "learned"
    # classes per task (the head_init=zero/shared/proto head's rows)
    ways: int = 0
    # each step's support loss on shifted support images (`shifted`; evaluation's fine-tuning)
    augment: bool = False
    # evaluation's test-time views (adapt_and_predict): 1 none
    views: int = 1


class Forward:
    """forward(params, x, step=0): params[k] is (T, *shape), x is (T, n, C, H, W) -> logits (T, n,
    ways); forward.features(params, x, step=0) -> (T, n, F). `step` is the inner step (per-step
    BatchNorm weights). one_at_a_time: the tasks through the network one by one, as the
    reference's loop (else at once, folded into grouped convolutions). native: torch's fused
    batch-norm kernel, where no double backward goes through it. rng: the generator of the
    backbone's random layers (DropBlock), None in evaluation."""

    def __init__(
        self, model: Backbone, one_at_a_time: bool, native: bool, rng: torch.Generator | None = None
    ):
        self.model, self.loop, self.native, self.rng = model, one_at_a_time, native, rng

    def _run(self, fn, p: Params, x: torch.Tensor, step: int, mask) -> torch.Tensor:
        # the loop's meta-training chunks are single tasks: no slicing, no cat
        if not self.loop or x.shape[0] == 1:
            return fn(p, x, step, self.native, self.rng, mask)
        return torch.cat(
            [
                fn(
                    {k: v[t : t + 1] for k, v in p.items()},
                    x[t : t + 1],
                    step,
                    self.native,
                    self.rng,
                    None if mask is None else mask[t : t + 1],
                )
                for t in range(x.shape[0])
            ]
        )

    def __call__(self, p: Params, x: torch.Tensor, step: int = 0, mask=None) -> torch.Tensor:
        """mask (T, n): a padded batch's real images (variable episodes), or None."""
        return self._run(self.model.tasks_forward, p, x, step, mask)

    def features(self, p: Params, x: torch.Tensor, step: int = 0, mask=None) -> torch.Tensor:
        return self._run(self.model.tasks_features, p, x, step, mask)


def make_forward(
    model: Backbone, one_at_a_time: bool = False, second_order: bool = True, rng=None
) -> Forward:
    """The Forward of the tasks at once, or one at a time. second_order=False lets the batched
    forward use the native batch-norm kernel (its double backward is never taken then); one task
    at a time, like the reference, always does: torch's fused kernel is exact there (its double
    backward is only wrong under vmap) and the fastest per-task choice."""
    native = one_at_a_time or not second_order
    return Forward(model, one_at_a_time, native=native, rng=rng)


def class_means(feats: torch.Tensor, y: torch.Tensor, width: int) -> torch.Tensor:
    """Each class's mean feature: feats (T, n, F), y (T, n) with -1 on padding rows -> (T, width,
    F) (a class with no row: 0), for support sets whose classes have different numbers of shots."""
    onehot = F.one_hot(y.clamp_min(0), width).to(feats) * (y >= 0).unsqueeze(-1).to(feats)
    counts = onehot.sum(1).clamp_min(1)  # (T, width)
    return torch.bmm(onehot.transpose(1, 2), feats) / counts.unsqueeze(-1)


def init_head(
    forward: Forward,
    params: Params,
    x_support: torch.Tensor,
    inner: Inner,
    y_support=None,
    ways=None,
) -> Params:
    """The head each task starts its inner loop from (Inner.head_init); params carry the task axis.
    Fixed episodes (ways None): the support is class-major (labels
    arange(ways).repeat_interleave(shots)), so the prototypes are means over consecutive rows.
    Variable ones: `ways` (T,) classes a task, the head as wide as the largest, the prototypes
    the means of each class's labelled rows (y_support, -1 on padding)."""
    mode = inner.head_init
    if mode == "learned":
        return params
    w, b = params["head.weight"], params["head.bias"]  # (T, rows, F), (T, rows)
    T, F_ = w.shape[0], w.shape[-1]
    width = (inner.ways or w.shape[1]) if ways is None else int(ways.max())
    if mode == "zero":
        w, b = w.new_zeros(T, width, F_), b.new_zeros(T, width)
    elif mode == "shared":
        w, b = w.expand(T, width, F_), b.expand(T, width)
    elif mode == "proto":
        if ways is None:
            c = (
                forward.features(params, x_support, 0).reshape(T, width, -1, F_).mean(2)
            )  # (T, ways, F)
        else:
            c = class_means(
                forward.features(params, x_support, 0, y_support >= 0), y_support, width
            )
        w, b = 2 * c, -(c * c).sum(-1)
    else:
        raise ValueError(f"unknown head_init {mode!r}")
    return dict(params, **{"head.weight": w, "head.bias": b})


PADDED = -1e4  # the logit of a class a variable episode does not have: exp() of it is exactly 0


def mask_classes(logits: torch.Tensor, ways: torch.Tensor) -> torch.Tensor:
    """Logits (T, n, W) of episodes with ways (T,) classes each: the columns past a task's ways
    set to PADDED, so its softmax is that of its own classes."""
    keep = (
        torch.arange(logits.shape[-1], device=logits.device) < ways.to(logits.device)[:, None, None]
    )
    return logits.masked_fill(~keep, PADDED)


def per_task_loss(logits: torch.Tensor, y: torch.Tensor, ways=None) -> torch.Tensor:
    """Mean cross-entropy of each task: logits (T, n, ways), y (T, n) -> (T,). Variable episodes
    (`ways` (T,)): over each task's own classes and real rows (label -1: padding)."""
    if ways is None:
        return (
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            .view(y.shape)
            .mean(1)
        )
    valid = y >= 0
    ce = F.cross_entropy(
        mask_classes(logits, ways).flatten(0, 1), y.clamp_min(0).flatten(), reduction="none"
    )
    return (ce.view(y.shape) * valid).sum(1) / valid.sum(1).clamp_min(1)


def per_task_accuracy(logits: torch.Tensor, y: torch.Tensor, ways=None) -> torch.Tensor:
    if ways is None:
        return (logits.argmax(-1) == y).float().mean(1)
    valid = y >= 0
    hits = (mask_classes(logits, ways).argmax(-1) == y) & valid
    return hits.sum(1).to(logits.dtype) / valid.sum(1).clamp_min(1)


# the direction of step i's shift (dy, dx), eight in turn
SHIFTS = ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


def shifted(x: torch.Tensor, step: int, d: int = 0) -> torch.Tensor:
    """Images (..., C, H, W) moved by `d` pixels (0: an eighth of their side) in step `step`'s
    direction (SHIFTS), the border repeated: the pseudo-queries of test-time fine-tuning (without
    them a 1-shot task's support loss at its own prototypes is about 0: each image is its class's
    prototype, and fine-tuning moves nothing), and evaluation's views. The same for every task
    and every batching: no random draw."""
    d = d or max(1, x.shape[-1] // 8)
    dy, dx = SHIFTS[step % len(SHIFTS)]
    h, w = x.shape[-2:]
    padded = F.pad(x.reshape(-1, *x.shape[-3:]), (d, d, d, d), mode="replicate")
    out = padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w]
    return out.reshape(x.shape)


def adapted(params: Params, inner: Inner) -> tuple[str, ...]:
    """The parameters the inner loop updates: inner.adapt_names, else every weight (never the
    learned learning rates)."""
    return inner.adapt_names or tuple(k for k in params if not is_lr(k))


def step_lr(lr, weight: torch.Tensor, step: int):
    """The inner learning rate of one step: a float, or a learned rate (T, *shape) / per step (T,
    steps, ...)."""
    if isinstance(lr, torch.Tensor) and lr.dim() == weight.dim() + 1:
        return lr.select(1, min(step, lr.shape[1] - 1))
    return lr


def _start(
    forward: Forward, params: Params, x_support, inner: Inner, names, y_support, ways
) -> Params:
    """The weights the inner loop starts from: `params` with the head `inner.head_init` makes."""
    fast = init_head(forward, dict(params), x_support, inner, y_support, ways)
    if not (inner.steps and torch.is_grad_enabled()) or inner.first_order:
        # first order: the inner gradients are taken on detached copies (adapt), so nothing here
        # needs a graph
        return fast
    # a head made of constants (zero, or detached prototypes) is still adapted
    fast = dict(
        fast, **{k: fast[k].detach().requires_grad_() for k in names if not fast[k].requires_grad}
    )
    if inner.head_init == "proto":
        # the inner gradient of the body is taken on aliases, so it does not run back through the
        # prototypes (a partial derivative, as first order's detached copies give); the
        # meta-gradient reaches the body both ways
        fast = dict(
            fast, **{k: fast[k].view_as(fast[k]) for k in names if not k.startswith("head.")}
        )
    return fast


def adapt(
    forward: Forward,
    params: Params,
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    inner: Inner,
    trajectory: bool = False,
    ways: torch.Tensor | None = None,
):
    """`inner.steps` SGD steps on each task's support loss, from the head `inner.head_init` makes;
    returns the fast weights (with trajectory=True, the list of fast weights after each step).

    Second order (first_order=False): the inner gradients stay in the graph (create_graph), so a
    meta-gradient flows through them. First order: the inner gradients are constants.
    Where params hold learned inner learning rates (`inner_lr.*`, model.lr_key) they replace
    `inner.lr`, per step where they have a step axis; the meta-gradient reaches them through the
    update. Step i's support forward uses step i's per-step BatchNorm weights, if any.
    Variable episodes (`ways` (T,), padding rows labelled -1): losses over each task's own classes
    and real images.
    """
    names = adapted(params, inner)
    lrs = {k: params.get(lr_key(k), inner.lr) for k in names}
    fast, path = _start(forward, params, x_support, inner, names, y_support, ways), []
    mask = None if ways is None else y_support >= 0
    for i in range(inner.steps):
        # the step's weights and index are bound here: checkpoint (algo.checkpoint_inner) calls
        # this again in the backward, when the loop has moved on
        x = shifted(x_support, i) if inner.augment else x_support

        def support_loss(*ws, fast=fast, i=i, x=x):
            logits = forward({**fast, **dict(zip(names, ws))}, x, i, mask)
            return per_task_loss(logits, y_support, ways).sum()

        ws = [fast[k] for k in names]
        # first order: the inner gradient is a constant, so it is taken on detached copies; the
        # support forward then never reaches weights the meta-loss still needs (the prototypes of
        # head_init=proto are made of the body's weights)
        wrt = [w.detach().requires_grad_() for w in ws] if inner.first_order else ws
        if inner.checkpoint and torch.is_grad_enabled():
            loss = checkpoint(support_loss, *wrt, use_reentrant=False)
        else:
            loss = support_loss(*wrt)
        # sum over tasks: each task's slice of the gradient is its own mean-loss gradient
        grads = torch.autograd.grad(loss, wrt, create_graph=not inner.first_order)
        fast = dict(fast, **{k: w - step_lr(lrs[k], w, i) * g for k, w, g in zip(names, ws, grads)})
        path.append(fast)
    return path if trajectory else fast


def per_task(params: Params, tasks: int) -> Params:
    """Meta-parameters viewed once per task (gradients flow back to the shared tensors); one task
    (the loop): a plain view, no expand node in its graph."""
    if tasks == 1:
        return {k: v.unsqueeze(0) for k, v in params.items()}
    return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}


def trim(batch: dict) -> dict:
    """Padded (variable) episodes cut to their own largest: a chunk's tensors, hence its rounding,
    do not depend on which other tasks it was padded with (so exact mode stays bit-identical for
    any world size). Fixed episodes are returned as they are."""
    if "ways" not in batch:
        return batch
    out = dict(batch)
    for part in ("support", "query"):
        rows = int((batch[f"y_{part}"] >= 0).sum(1).max())
        out[f"x_{part}"], out[f"y_{part}"] = (
            batch[f"x_{part}"][:, :rows],
            batch[f"y_{part}"][:, :rows],
        )
    return out


def adapt_task(
    model: Backbone, params: Params, batch: dict, inner: Inner, one_at_a_time: bool = False
):
    """Evaluation's adaptation: detached copies of the weights adapted to batch's support (first
    order, no meta-graph; x_support, y_support, and for variable episodes ways). Returns the
    Forward and the adapted weights (T, *shape), detached."""
    forward = make_forward(model, one_at_a_time, second_order=False)
    x_support = batch["x_support"]
    # views of the weights, no graph: each step's update makes new tensors, and no step keeps
    # the one before it alive (a ResNet-18's 64 tasks x 10 steps of weights were 29 GB)
    fast = {
        k: v.detach().unsqueeze(0).expand(x_support.shape[0], *v.shape) for k, v in params.items()
    }
    with torch.enable_grad():
        first = dataclasses.replace(inner, first_order=True)
        fast = adapt(forward, fast, x_support, batch["y_support"], first, ways=batch.get("ways"))
    return forward, {k: v.detach() for k, v in fast.items()}


def views(batch: dict, n: int) -> list[dict]:
    """`batch` as it is, then n - 1 copies whose support and query images are moved by a pixel
    per 28 of their side in SHIFTS' directions (test-time augmentation)."""
    d = max(1, batch["x_query"].shape[-1] // 28)
    moved = [
        dict(
            batch,
            x_support=shifted(batch["x_support"], i, d),
            x_query=shifted(batch["x_query"], i, d),
        )
        for i in range(n - 1)
    ]
    return [batch, *moved]


def adapt_and_predict(
    model: Backbone, params: Params, batch: dict, inner: Inner, one_at_a_time: bool = False
) -> torch.Tensor:
    """Evaluation: adapt (adapt_task), then predict batch's query (x_query; for variable
    episodes y_query, whose -1 rows are padding). Returns query logits (T, n, ways); for variable
    episodes the columns past a task's ways are PADDED. inner.views > 1: the log of the class
    probabilities averaged over the views (the images as they are, then moved: `views`)."""
    batch = trim(batch)
    if inner.views > 1:
        one = dataclasses.replace(inner, views=1)
        probs = sum(
            adapt_and_predict(model, params, v, one, one_at_a_time).softmax(-1)
            for v in views(batch, inner.views)
        )
        return (probs / inner.views).log()
    forward, fast = adapt_task(model, params, batch, inner, one_at_a_time)
    ways = batch.get("ways")
    mask = None if ways is None else batch["y_query"] >= 0
    with torch.no_grad():
        logits = forward(fast, batch["x_query"], max(0, inner.steps - 1), mask)
    return logits if ways is None else mask_classes(logits, ways)
