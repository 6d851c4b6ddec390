"""The meta-step as one package, in the order a run meets it:

- `plan.py`: what a rank computes, decided once before the step exists (tasks at once, exact or
  fast, eager, compiled or a CUDA graph; the measurement and its per-machine cache), as a frozen
  `Plan` the run records and a resumed run reads back;
- `compute.py`: the seam a chunk of tasks goes through to become losses and gradients, with its
  implementations (eager, compiled by inductor, captured as a CUDA graph);
- `reduce.py`: the sum over ranks (the exact tree over fixed groups, or fast mode's all-reduce),
  owning its padding and its collectives;
- `meta_step.py`: `MetaStep`, built complete from a plan: compute, reduce, clip, Adam, schedule.

The Trainer asks `for_run` for a plan (its checkpoint's, or `decide`d now) and builds `MetaStep`
once; nothing changes it later.
"""

from metadist.step.meta_step import (
    ByOrder,
    MetaStep,
    StepSettings,
    Trainable,
    TrainError,
    build,
    runner,
)
from metadist.step.plan import Ask, Plan, decide

__all__ = [
    "Ask",
    "ByOrder",
    "MetaStep",
    "Plan",
    "StepSettings",
    "TrainError",
    "Trainable",
    "build",
    "decide",
    "runner",
]
