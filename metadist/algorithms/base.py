"""What every algorithm is: `Algorithm`, built from the algo section for a model. An algorithm owns
its training loss over a chunk of tasks (`task_losses`), the inner loop it trains with
(`train_inner`) and the one of evaluation (`test_inner`), the head its model needs (`head_rows`),
whether its model must take a second derivative of its own backward (`second_order_body`), what
a step's batch carries besides the episodes (`batch_extras`), the batches it trains on (`stream`)
and what it writes at the end of a run (`outputs`); the trainer and the step ask it, never which
algorithm it runs.
"""

from __future__ import annotations

import dataclasses
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

from metadist.algorithms.core import HEAD_INITS, Inner
from metadist.errors import MetadistError
from metadist.models import Backbone, is_lr


class AlgorithmError(MetadistError):
    """algo.* settings that do not go together."""


@dataclass(frozen=True)
class Algorithm(metaclass=ABCMeta):
    name: str
    train_inner: Inner

    # what a subclass is (class attributes)
    inner_loop = True  # False: no inner loop in training (transfer, protonet, pretrain)
    first_order = False  # inner gradients are constants
    head_only = False  # the inner loop adapts the head only (ANIL)
    # the head every task starts from, whatever algo.head_init (protonet: proto)
    forced_head = None
    test_steps = None  # forced test-time steps (protonet: 0, the prototypes alone)
    # evaluation adapts the head only (pretrain: a new head on the features)
    test_head_only = False

    # ---- built from the config ----
    @classmethod
    def check(cls, a) -> None:
        """algo.head_init makes sense for this algorithm (a one-line AlgorithmError)."""
        if a.head_init not in HEAD_INITS:
            raise AlgorithmError(
                f"algo.head_init={a.head_init!r}: allowed values are {', '.join(HEAD_INITS)}"
            )
        if a.head_init != "learned" and not cls.takes_head_init():
            raise AlgorithmError(
                f"algo.head_init={a.head_init!r} is for maml, fomaml, anil and pretrain's "
                f"evaluation; {a.name} trains no inner loop"
            )

    @classmethod
    def takes_head_init(cls) -> bool:
        """Whether algo.head_init means something here (an inner loop starts from that head)."""
        return cls.inner_loop or cls.forced_head is not None

    @classmethod
    def head_init(cls, a) -> str:
        """The head a task starts from, in training and evaluation."""
        return cls.forced_head or a.head_init

    @classmethod
    def variable_problem(cls, a) -> str | None:
        """Why this algorithm cannot train on variable episodes (5 to 50 classes a task), or None:
        the head a task starts from must not have a fixed number of rows."""
        if cls.head_init(a) == "learned":
            return (
                f"algo.name={a.name} with algo.head_init=learned: a learned head has a fixed "
                "number of rows and variable episodes (data.episode=variable) have 5 to 50 "
                "classes; set algo.head_init=zero, shared or proto, or algo.name=protonet"
            )
        return None

    @classmethod
    def sources_problem(cls, a) -> str | None:
        """Why this algorithm cannot train on many sources at once (data.sources), or None."""
        return None

    @classmethod
    def second_order_body(cls, a) -> bool:
        """Whether training differentiates through the inner gradients of every weight (a
        network's own backward differentiated again: a library network's attention must then
        take its plain, twice-differentiable path)."""
        return cls.inner_loop and not cls.head_only and not (cls.first_order or a.first_order)

    @classmethod
    def head_rows(cls, a, ways: int, train_classes: int) -> int:
        """The rows of the model's head: one per class of a task (one shared row for
        head_init=shared)."""
        return 1 if a.head_init == "shared" else ways

    @classmethod
    def build(cls, a, model: Backbone, ways: int, first_order: bool = False) -> Algorithm:
        """For algo section `a` and `model`, tasks of `ways` classes; `first_order=True` forces
        first-order inner gradients (derivative-order annealing's first steps)."""
        if cls.head_only:
            names = model.head_names()
        # per-step BatchNorm weights are meta-learned only (as in MAML++)
        elif a.per_step_bn:
            names = tuple(
                k for k, _ in model.named_parameters() if not is_lr(k) and not model.is_norm(k)
            )
        else:
            names = None
        inner = Inner(
            a.inner_steps if cls.inner_loop else 0,
            a.inner_lr,
            first_order or a.first_order or cls.first_order,
            names,
            a.checkpoint_inner,
            cls.head_init(a),
            ways,
        )
        return cls(a.name, inner)

    # ---- training ----
    @abstractmethod
    def task_losses(self, forward, params, batch):
        """(query loss per task, accuracy per task) of a chunk of tasks."""

    @property
    def second_order(self) -> bool:
        """Whether a meta-step differentiates through inner gradients."""
        return self.train_inner.steps > 0 and not self.train_inner.first_order

    def batch_extras(self, step: int, batch: dict) -> dict:
        """What meta-step `step`'s batch carries besides the episodes (inputs that change with the
        step, so one compiled or captured step serves every step): none."""
        return {}

    def stream(self, source, spec):
        """This rank's training batches (metadist.data.device): episodes of the train split. (The
        data modules are imported here, when a run starts: algorithms import no webdataset.)"""
        from metadist.data.device import meta_batches

        return meta_batches(source, spec)

    def outputs(self, model: Backbone) -> dict[str, dict]:
        """Weights files this algorithm writes at the end of a run besides the model: name ->
        tensors."""
        return {}

    # ---- evaluation ----
    def test_inner(
        self,
        steps: int,
        lr: float,
        head_names: tuple[str, ...] | None = None,
        finetune: bool = False,
        augment: bool = False,
        views: int = 1,
    ) -> Inner:
        """The inner loop of evaluation: `steps` (the algorithm's own, if it forces them), first
        order; `finetune` (eval.finetune): `steps` steps on every weight, whatever the
        algorithm adapts; `augment` (eval.augment): each step on shifted support images; `views`
        (eval.views): the test-time views predictions are averaged over."""
        if finetune:
            names = None
        else:
            names = head_names if self.test_head_only else self.train_inner.adapt_names
            steps = steps if self.test_steps is None else self.test_steps
        return dataclasses.replace(
            self.train_inner,
            steps=steps,
            lr=lr,
            first_order=True,
            adapt_names=names,
            augment=augment,
            views=views,
        )
