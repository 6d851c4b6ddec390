"""The exercise's transfer-learning baseline: ordinary supervised training on the classes of
sampled tasks (support and query images together, labels within the task); at test time the
weights are fine-tuned on the support set by the same `adapt` and predict the query.
"""

from __future__ import annotations

import torch

from metadist.algorithms.base import Algorithm
from metadist.algorithms.core import per_task_accuracy, per_task_loss


def task_losses(forward, params, batch, inner=None):
    x = torch.cat([batch["x_support"], batch["x_query"]], 1)
    y = torch.cat([batch["y_support"], batch["y_query"]], 1)
    logits = forward(params, x)
    return per_task_loss(logits, y), per_task_accuracy(logits, y)


class Transfer(Algorithm):
    inner_loop = False

    @classmethod
    def variable_problem(cls, a) -> str | None:
        return (
            "algo.name=transfer trains a head of a fixed number of rows on each task's classes, "
            "and variable episodes have 5 to 50: use maml, fomaml or anil with "
            "algo.head_init=zero, shared or proto, or protonet"
        )

    def task_losses(self, forward, params, batch):
        return task_losses(forward, params, batch)
