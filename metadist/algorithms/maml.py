"""MAML (second order), first-order MAML and ANIL: one `adapt` with different settings.

task_losses(forward, params, batch, inner) -> (query loss per task, query accuracy per task).
"""
from __future__ import annotations

from metadist.algorithms.core import Inner, adapt, per_task_accuracy, per_task_loss


def task_losses(forward, params, batch, inner: Inner):
    fast = adapt(forward, params, batch["x_support"], batch["y_support"], inner)
    logits = forward(fast, batch["x_query"])
    return per_task_loss(logits, batch["y_query"]), per_task_accuracy(logits, batch["y_query"])
