"""The MAML family, each a short task_losses() built on core.adapt, chosen by `algo.name`.

`Algorithm.train_inner` is the inner loop used in meta-training; `test_inner(steps)` the one
used at validation and test (always first order, no meta-graph).
"""
from __future__ import annotations

from dataclasses import dataclass

from metadist.algorithms import maml, transfer
from metadist.algorithms.core import Inner
from metadist.config import Config
from metadist.model import ConvNet


@dataclass
class Algorithm:
    name: str
    train_inner: Inner
    adapt_names: tuple[str, ...] | None

    def task_losses(self, forward, params, batch):
        if self.name == "transfer":
            return transfer.task_losses(forward, params, batch)
        return maml.task_losses(forward, params, batch, self.train_inner)

    @property
    def second_order(self) -> bool:
        """Whether a meta-step differentiates through inner gradients."""
        return self.train_inner.steps > 0 and not self.train_inner.first_order

    def test_inner(self, steps: int, lr: float) -> Inner:
        return Inner(steps, lr, True, self.adapt_names)


def build(cfg: Config, model: ConvNet, step: int | None = None) -> Algorithm:
    """The algorithm as configured; at a given `step` derivative-order annealing may make it first order."""
    a = cfg.algo
    adapt_names = model.head_names() if a.name == "anil" else None
    first_order = a.first_order or a.name == "fomaml" or (step is not None and step < a.first_order_steps)
    steps = 0 if a.name == "transfer" else a.inner_steps
    return Algorithm(a.name, Inner(steps, a.inner_lr, first_order, adapt_names, a.checkpoint_inner), adapt_names)
