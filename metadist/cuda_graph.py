"""One meta-step (inner loop, query losses, meta-backward) captured as a CUDA graph and replayed.

On a GPU a 5-way 1-shot meta-step is hundreds of tiny kernels: the time goes to launching them,
not to running them. A captured graph launches them all at once. The episode batch is copied into
static buffers before each replay; the meta-gradients land in the parameters' `.grad` tensors,
which belong to the graph and are overwritten (not accumulated) by every replay, so the caller
must not set them to None between steps. Parameters are updated in place by the optimizer, so
the graph always reads the current weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedStep:
    def __init__(
        self,
        fn: Callable[[dict], tuple],
        params: list[torch.Tensor],
        example: dict,
        warmup: int = 3,
    ):
        """fn(batch) -> outputs (tensors); it must leave its gradients in params' .grad."""
        self.params = params
        self.static = {k: v.detach().clone() for k, v in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # warm-up outside the capture (cuDNN plans, allocator)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._clear()
                fn(self.static)
        torch.cuda.current_stream().wait_stream(side)
        self._clear()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.static)
        self.grads = [p.grad for p in params]

    def _clear(self):
        for p in self.params:
            p.grad = None

    def __call__(self, batch: dict):
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        for p, g in zip(self.params, self.grads):  # re-attach, should anyone have replaced them
            p.grad = g
        self.graph.replay()
        return self.out
