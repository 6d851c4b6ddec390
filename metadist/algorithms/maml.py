"""MAML (second order), first-order MAML and ANIL: one `adapt` with different settings.

task_losses -> (query loss per task, query accuracy per task). With `batch["msl_weights"]`
(tasks, steps), MAML++'s multi-step loss: the query loss after every inner step, weighted; the
accuracy is the last step's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from metadist.algorithms.base import Algorithm
from metadist.algorithms.core import Inner, adapt, per_task_accuracy, per_task_loss


def task_losses(forward, params, batch, inner: Inner):
    ways = batch.get("ways")  # variable episodes: each task's classes; padding rows labelled -1
    x_query, y_query = batch["x_query"], batch["y_query"]
    mask = None if ways is None else y_query >= 0
    if "msl_weights" in batch and inner.steps > 1:
        path = adapt(forward, params, batch["x_support"], batch["y_support"], inner, True, ways)
        w = batch["msl_weights"]
        loss = 0.0
        for i, fast in enumerate(path):
            logits = forward(fast, x_query, i, mask)
            loss = loss + w[:, i] * per_task_loss(logits, y_query, ways)
        return loss, per_task_accuracy(logits, y_query, ways)
    fast = adapt(forward, params, batch["x_support"], batch["y_support"], inner, ways=ways)
    logits = forward(fast, x_query, max(0, inner.steps - 1), mask)
    return per_task_loss(logits, y_query, ways), per_task_accuracy(logits, y_query, ways)


def msl_weights(step: int, steps: int, anneal: int):
    """MAML++'s per-step loss importance at meta-step `step`: uniform at first, the non-final
    steps decaying linearly to 0.03/steps over `anneal` meta-steps, the last step taking the
    rest."""
    import torch

    progress = min(1.0, step / max(1, anneal))
    floor = 0.03 / steps
    w = torch.full((steps,), max(1.0 / steps - progress / steps, floor), dtype=torch.float64)
    w[-1] = min(1.0 / steps + progress * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
    return w


@dataclass(frozen=True)
class MAML(Algorithm):
    """Second-order MAML (Finn et al. 2017): the query loss after adapting every weight. With
    algo.multi_step_loss (MAML++), the query loss after every inner step, weighted by
    `msl_weights` over the first multi_step_loss meta-steps."""

    multi_step_loss: int = 0

    @classmethod
    def build(cls, a, model, ways: int, first_order: bool = False) -> MAML:
        built = super().build(a, model, ways, first_order)
        return dataclasses.replace(built, multi_step_loss=a.multi_step_loss)

    def task_losses(self, forward, params, batch):
        return task_losses(forward, params, batch, self.train_inner)

    def batch_extras(self, step: int, batch: dict) -> dict:
        """MAML++'s multi-step loss weights of meta-step `step`, per task."""
        steps = self.train_inner.steps
        if not (step < self.multi_step_loss and steps > 1):
            return {}
        w = msl_weights(step, steps, self.multi_step_loss).to(batch["x_support"])
        return {"msl_weights": w.expand(batch["x_support"].shape[0], -1)}


class FOMAML(MAML):
    """First-order MAML: the inner gradients are constants."""

    first_order = True


class ANIL(MAML):
    """ANIL (Raghu et al. 2020): only the head adapts in the inner loop."""

    head_only = True
