"""The MAML family as a table: `ALGORITHMS` maps `algo.name` to its task losses and the settings
of the one inner loop it uses. Adding an algorithm is one entry here (config validates
`algo.name` against this table). Also here: the model a config describes (`build_model`).
Which strategy runs a rank's tasks is metadist/strategy.py's business.

`Algorithm.train_inner` is the inner loop of meta-training; `test_inner(steps, lr)` the one of
validation, test and predict (always first order, no meta-graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from metadist.algorithms import maml, transfer
from metadist.algorithms.core import Inner
from metadist.model import ConvNet, is_lr

if TYPE_CHECKING:
    from metadist.config import Config


@dataclass(frozen=True)
class Spec:
    """task_losses(forward, params, batch, inner) -> (query loss per task, accuracy per task)."""
    task_losses: Callable
    first_order: bool = False     # inner gradients are constants
    head_only: bool = False       # the inner loop adapts the head only (ANIL)
    inner_loop: bool = True       # False: no inner loop in training (the transfer baseline)


ALGORITHMS: dict[str, Spec] = {
    "maml": Spec(maml.task_losses),
    "fomaml": Spec(maml.task_losses, first_order=True),
    "anil": Spec(maml.task_losses, head_only=True),
    "transfer": Spec(transfer.task_losses, inner_loop=False),
}


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

    def test_inner(self, steps: int, lr: float) -> Inner:
        return Inner(steps, lr, True, self.train_inner.adapt_names)


def build(cfg: Config, model: ConvNet, first_order: bool = False) -> Algorithm:
    """The configured algorithm; `first_order=True` forces first-order inner gradients (what
    derivative-order annealing asks for in its first `algo.first_order_steps` steps)."""
    a = cfg.algo
    spec = ALGORITHMS[a.name]
    if spec.head_only:
        names = model.head_names()
    elif a.per_step_bn:         # per-step BatchNorm weights are meta-learned only (as in MAML++)
        names = tuple(k for k, _ in model.named_parameters() if not is_lr(k) and ".norm." not in k)
    else:
        names = None
    inner = Inner(a.inner_steps if spec.inner_loop else 0, a.inner_lr, first_order or a.first_order or spec.first_order,
                  names, a.checkpoint_inner)
    return Algorithm(a.name, spec, inner)


def build_model(cfg: Config, image_shape: tuple[int, int, int] | None = None) -> ConvNet:
    """The model of `cfg` for images of `image_shape` (C, H, W): the shards' manifest says it;
    by default the config's data.channels and data.image_size (what the manifest must match)."""
    c, h, w = image_shape or (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    return ConvNet(cfg.data.ways, cfg.model.hidden, cfg.model.depth, in_channels=c, side=h,
                   learn_lr=cfg.algo.learn_inner_lr, lr_init=cfg.algo.inner_lr, steps=cfg.algo.inner_steps,
                   per_step_bn=cfg.algo.per_step_bn)
