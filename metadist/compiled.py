"""`algo.compile=on`: a chunk's whole meta-backward as one compiled graph, on a CPU.

The eager meta-step is hundreds of small operations, and on a CPU the element-wise ones (BatchNorm,
ReLU, pooling and their double backward) are memory-bound: each reads and writes a full activation.
Here the chunk's computation, from the meta-parameters and the episodes to the losses, accuracies
and meta-gradient (the inner loop's autograd.grad with create_graph and the outer one included),
is traced once into one ATen graph (make_fx follows autograd through both) and compiled by
inductor, which fuses those element-wise operations into a few loops. One graph per chunk shape
(and algorithm variant), compiled at its first use (about a minute for Conv4 on 2 cores; inductor
keeps compiled graphs in its on-disk cache, so later runs take seconds).

Inductor's layout optimisation (convolutions in channels-last) is turned off: with it, the
float32 meta-gradient of Conv4 was 1e-4 to 8e-3 (relative) from the float64 one, against about
1e-6 for the eager step, on an Intel Xeon; without it the compiled step is as close as the eager
one. The compiled graph computes the same maths as the eager step (tests/test_compiled.py: equal
in float64), in other float32 rounding.
"""

from __future__ import annotations

import torch

from metadist.algorithms.core import make_forward, per_task


class CompiledChunks:
    """chunks(task_losses, model, params, chunk, strategy, second_order, scale) -> (losses (t,),
    accuracies (t,), gradients of scale * the losses' sum in params' order, None where a weight
    gets none): the compiled graph of that computation, built on the first call of each shape."""

    def __init__(self):
        self.graphs = {}

    def __call__(self, task_losses, model, params, chunk, strategy, second_order, scale):
        keys = sorted(k for k, v in chunk.items() if isinstance(v, torch.Tensor))
        # contiguous: the graph is traced for, and fed, one memory layout
        inputs = [p.detach() for p in params.values()] + [chunk[k].contiguous() for k in keys]
        sig = (
            id(getattr(task_losses, "__self__", task_losses)),
            strategy,
            second_order,
            scale,
            tuple(keys),
            tuple((tuple(v.shape), v.dtype, v.device.type) for v in inputs),
            tuple(p.requires_grad for p in params.values()),
        )
        if sig not in self.graphs:
            self.graphs[sig] = self._build(
                task_losses, model, params, keys, (strategy, second_order, scale), inputs
            )
        run, used = self.graphs[sig]
        out = iter(run(*inputs))
        losses, accs = next(out), next(out)
        return losses, accs, [next(out) if u else None for u in used]

    @staticmethod
    def _build(task_losses, model, params, keys, how, inputs):
        """(compiled callable, which params get a gradient)."""
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torch.fx.experimental.proxy_tensor import make_fx

        strategy, second_order, scale = how
        names, grad = list(params), [p.requires_grad for p in params.values()]
        tasks = inputs[len(names) + keys.index("x_support")].shape[0]
        used = []

        def step(*args):
            ps = {k: v.requires_grad_(g) for k, v, g in zip(names, args, grad)}
            chunk = dict(zip(keys, args[len(names) :]))
            forward = make_forward(model, strategy, second_order)
            losses, accs = task_losses(forward, per_task(ps, tasks), chunk)
            wrt = [v for v in ps.values() if v.requires_grad]
            grads = iter(torch.autograd.grad(losses.sum() * scale, wrt, allow_unused=True))
            got = [next(grads) if v.requires_grad else None for v in ps.values()]
            used[:] = [g is not None for g in got]
            return (losses.detach(), accs.detach(), *[g for g in got if g is not None])

        graph = make_fx(step)(*[v.clone() for v in inputs])
        with inductor_config.patch(layout_optimization=False):
            run = compile_fx(graph, inputs)
        return run, list(used)
