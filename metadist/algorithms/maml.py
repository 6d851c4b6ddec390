"""MAML (second order), first-order MAML and ANIL: one `adapt` with different settings.

task_losses -> (query loss per task, query accuracy per task). With `batch["msl_weights"]`
(tasks, steps), MAML++'s multi-step loss: the query loss after every inner step, weighted; the
accuracy is the last step's.
"""

from __future__ import annotations

from metadist.algorithms.base import Algorithm
from metadist.algorithms.core import Inner, adapt, per_task_accuracy, per_task_loss


def task_losses(forward, params, batch, inner: Inner):
    if "msl_weights" in batch and inner.steps > 1:
        path = adapt(
            forward, params, batch["x_support"], batch["y_support"], inner, trajectory=True
        )
        w = batch["msl_weights"]
        loss = 0.0
        for i, fast in enumerate(path):
            logits = forward(fast, batch["x_query"], i)
            loss = loss + w[:, i] * per_task_loss(logits, batch["y_query"])
        return loss, per_task_accuracy(logits, batch["y_query"])
    fast = adapt(forward, params, batch["x_support"], batch["y_support"], inner)
    logits = forward(fast, batch["x_query"], max(0, inner.steps - 1))
    return per_task_loss(logits, batch["y_query"]), per_task_accuracy(logits, batch["y_query"])


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


class MAML(Algorithm):
    """Second-order MAML (Finn et al. 2017): the query loss after adapting every weight."""

    def task_losses(self, forward, params, batch):
        return task_losses(forward, params, batch, self.train_inner)


class FOMAML(MAML):
    """First-order MAML: the inner gradients are constants."""

    first_order = True


class ANIL(MAML):
    """ANIL (Raghu et al. 2020): only the head adapts in the inner loop."""

    head_only = True
