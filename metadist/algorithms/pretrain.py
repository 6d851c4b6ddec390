"""Supervised pre-training: a classifier over every class of the train split, trained on groups of
images with their class labels (metadist.data.order.ClassBatches: data.ways * (shots + queries)
images per "task"); evaluated like a meta-learner, each task's head started from its prototypes
(algo.head_init=learned means proto here) and adapted alone (test_head_only). At the end it
writes backbone.safetensors, the body without the head or learned rates: what `model.init` starts
a meta-learning run from.
"""

from __future__ import annotations

from metadist.algorithms.base import Algorithm
from metadist.algorithms.transfer import task_losses
from metadist.models import backbone_weights


class Pretrain(Algorithm):
    inner_loop = False
    test_head_only = True

    @classmethod
    def takes_head_init(cls) -> bool:
        return True  # the head its evaluation starts from

    @classmethod
    def head_init(cls, a) -> str:
        """Its head is over every train class: a task's evaluation starts from the prototypes
        unless told otherwise."""
        return "proto" if a.head_init == "learned" else a.head_init

    @classmethod
    def variable_problem(cls, a) -> str | None:
        return None  # it trains on class batches; each task's evaluation head is its own

    @classmethod
    def sources_problem(cls, a) -> str | None:
        return (
            "algo.name=pretrain classifies one source's train classes; with many data.sources "
            "pre-train on one (data.shards) and start from its backbone (model.init)"
        )

    @classmethod
    def head_rows(cls, a, ways: int, train_classes: int) -> int:
        return train_classes

    def task_losses(self, forward, params, batch):
        return task_losses(forward, params, batch)

    def stream(self, source, spec):
        from metadist.data.device import class_batches

        group = source.ways * (source.shots + source.queries)
        return class_batches(source, spec, group)

    def outputs(self, model) -> dict[str, dict]:
        return {"backbone.safetensors": backbone_weights(model)}
