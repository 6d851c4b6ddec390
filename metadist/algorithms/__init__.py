"""The MAML family as a table: `ALGORITHMS` maps `algo.name` to its task losses and the settings
of the one inner loop it uses. Adding an algorithm is one entry here; `check` validates
`algo.name` and `algo.head_init` against it (where algorithms are built: config.py imports none
of this). The model a config describes is metadist.models.build_model; which strategy runs a
rank's tasks is metadist/strategy.py's business.

`Algorithm.train_inner` is the inner loop of meta-training; `test_inner(steps, lr)` the one of
validation, test and predict (always first order, no meta-graph).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from metadist.algorithms import maml, transfer
from metadist.algorithms.core import HEAD_INITS, Inner
from metadist.models import Backbone, is_lr

if TYPE_CHECKING:
    from metadist.config import Config


@dataclass(frozen=True)
class Spec:
    """task_losses(forward, params, batch, inner) -> (query loss per task, accuracy per task)."""
    task_losses: Callable
    first_order: bool = False     # inner gradients are constants
    head_only: bool = False       # the inner loop adapts the head only (ANIL)
    inner_loop: bool = True       # False: no inner loop in training (transfer, protonet, pretrain)
    head_init: str | None = None  # forced head init (protonet: proto); None = algo.head_init
    test_steps: int | None = None  # forced test-time steps (protonet: 0, the prototypes alone)
    test_head_only: bool = False  # evaluation adapts the head only (pretrain: a new head on the features)
    pretrain: bool = False        # trains on image batches with labels over every train class


ALGORITHMS: dict[str, Spec] = {
    "maml": Spec(maml.task_losses),
    "fomaml": Spec(maml.task_losses, first_order=True),
    "anil": Spec(maml.task_losses, head_only=True),
    "transfer": Spec(transfer.task_losses, inner_loop=False),
    "protonet": Spec(maml.task_losses, inner_loop=False, head_init="proto", test_steps=0),
    "pretrain": Spec(transfer.task_losses, inner_loop=False, test_head_only=True, pretrain=True),
}


def check(cfg: Config) -> None:
    """algo.name and algo.head_init name things this table knows (a one-line ConfigError)."""
    from metadist.config import ConfigError
    a = cfg.algo
    if a.name not in ALGORITHMS:
        raise ConfigError(f"algo.name={a.name!r}: allowed values are {', '.join(ALGORITHMS)}")
    if a.head_init not in HEAD_INITS:
        raise ConfigError(f"algo.head_init={a.head_init!r}: allowed values are {', '.join(HEAD_INITS)}")
    spec = ALGORITHMS[a.name]
    if a.head_init != "learned" and not spec.inner_loop and not spec.pretrain and spec.head_init is None:
        raise ConfigError(f"algo.head_init={a.head_init!r} is for maml, fomaml, anil and pretrain's evaluation; "
                          f"{a.name} trains no inner loop")


def head_init(cfg: Config) -> str:
    """The head a task starts from, in training and evaluation: the algorithm's own (protonet), else
    algo.head_init; pretrain's head is over every train class, so its evaluation starts each task
    from the prototypes unless told otherwise."""
    spec = ALGORITHMS[cfg.algo.name]
    if spec.head_init:
        return spec.head_init
    if spec.pretrain and cfg.algo.head_init == "learned":
        return "proto"
    return cfg.algo.head_init


@dataclass(frozen=True)
class Algorithm:
    name: str
    spec: Spec
    train_inner: Inner

    def task_losses(self, forward, params, batch):
        return self.spec.task_losses(forward, params, batch, self.train_inner)

    @property
    def second_order(self) -> bool:
        """Whether a meta-step differentiates through inner gradients."""
        return self.train_inner.steps > 0 and not self.train_inner.first_order

    def test_inner(self, steps: int, lr: float, head_names: tuple[str, ...] | None = None) -> Inner:
        """The inner loop of evaluation: `steps` (the algorithm's own, if it forces them), first order."""
        names = head_names if self.spec.test_head_only else self.train_inner.adapt_names
        steps = steps if self.spec.test_steps is None else self.spec.test_steps
        return dataclasses.replace(self.train_inner, steps=steps, lr=lr, first_order=True, adapt_names=names)


def build(cfg: Config, model: Backbone, first_order: bool = False) -> Algorithm:
    """The configured algorithm; `first_order=True` forces first-order inner gradients (what
    derivative-order annealing asks for in its first `algo.first_order_steps` steps)."""
    check(cfg)
    a = cfg.algo
    spec = ALGORITHMS[a.name]
    if spec.head_only:
        names = model.head_names()
    elif a.per_step_bn:         # per-step BatchNorm weights are meta-learned only (as in MAML++)
        names = tuple(k for k, _ in model.named_parameters() if not is_lr(k) and not model.is_norm(k))
    else:
        names = None
    inner = Inner(a.inner_steps if spec.inner_loop else 0, a.inner_lr, first_order or a.first_order or spec.first_order,
                  names, a.checkpoint_inner, head_init(cfg), cfg.data.ways)
    return Algorithm(a.name, spec, inner)
