"""Prototypical networks (Snell et al. 2017): no inner loop; each task's head is made of its class
prototypes (the proto head of algorithms/core.py: weights 2 c_k, bias -|c_k|^2), so the query's
cross-entropy is the Euclidean prototypical loss; at test each query goes to the nearest prototype.
"""

from __future__ import annotations

from metadist.algorithms.maml import MAML


class ProtoNet(MAML):
    inner_loop = False
    forced_head = "proto"
    test_steps = 0
