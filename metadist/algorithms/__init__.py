"""The algorithms as a table: `ALGORITHMS` maps `algo.name` to its class (algorithms/base.py says
what an algorithm owns). Adding an algorithm is one module and one entry here; `check` validates
`algo.name` and `algo.head_init` against it (config.py imports none of this). The model a config
describes is metadist.models.build_model; how a rank computes its tasks (tasks at once, the
reduction) is metadist/step/'s business: an algorithm gives losses, not gradients.

`Algorithm.train_inner` is the inner loop of meta-training; `test_inner(steps, lr)` the one of
validation, test and predict (always first order, no meta-graph).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metadist.algorithms.base import Algorithm, AlgorithmError
from metadist.algorithms.core import HEAD_INITS, Inner
from metadist.algorithms.maml import ANIL, FOMAML, MAML
from metadist.algorithms.pretrain import Pretrain
from metadist.algorithms.protonet import ProtoNet
from metadist.algorithms.transfer import Transfer

if TYPE_CHECKING:
    from metadist.config import AlgoConfig, EvalConfig, ModelConfig
    from metadist.models import Backbone

ALGORITHMS: dict[str, type[Algorithm]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "anil": ANIL,
    "transfer": Transfer,
    "protonet": ProtoNet,
    "pretrain": Pretrain,
}


def get(a: AlgoConfig) -> type[Algorithm]:
    """The class of algo.name, its settings checked (a one-line error)."""
    from metadist.config import ConfigError

    if a.name not in ALGORITHMS:
        raise ConfigError(f"algo.name={a.name!r}: allowed values are {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[a.name]
    try:
        cls.check(a)
    except AlgorithmError as e:
        raise ConfigError(str(e)) from None
    return cls


def check(a: AlgoConfig, variable: bool = False, sources: bool = False) -> None:
    """The algorithm's name, and whether it trains on variable episodes and many sources: a
    ConfigError before anything starts."""
    from metadist.config import ConfigError

    cls = get(a)
    for problem in (variable and cls.variable_problem(a), sources and cls.sources_problem(a)):
        if problem:
            raise ConfigError(problem)


def build(a: AlgoConfig, model: Backbone, ways: int, first_order: bool = False) -> Algorithm:
    """The configured algorithm for `model` and tasks of `ways` classes (see Algorithm.build)."""
    return get(a).build(a, model, ways, first_order)


def model_of(
    m: ModelConfig, a: AlgoConfig, image_shape: tuple[int, int, int], rows: int
) -> Backbone:
    """The model of section `m` for images of `image_shape` with a head of `rows` rows, built
    for what algorithm `a` needs of it (Algorithm.second_order_body)."""
    from metadist.models import build_model

    return build_model(m, a, image_shape, rows, second_order=get(a).second_order_body(a))


def eval_inner(
    a: AlgoConfig, e: EvalConfig, model: Backbone, ways: int, steps: int | None = None
) -> Inner:
    """The inner loop that validation, test and predict adapt with: `steps` steps (default
    eval.inner_steps) at eval.inner_lr (negative: algo.inner_lr), on every weight with
    eval.finetune, on shifted support images with eval.augment, predicting over eval.views."""
    return build(a, model, ways).test_inner(
        e.inner_steps if steps is None else steps,
        e.inner_lr if e.inner_lr >= 0 else a.inner_lr,
        model.head_names(),
        e.finetune,
        e.augment,
        e.views,
    )


__all__ = [
    "ALGORITHMS",
    "HEAD_INITS",
    "Algorithm",
    "Inner",
    "build",
    "check",
    "eval_inner",
    "get",
    "model_of",
]
