"""The baseline every speed figure is a ratio against: a faithful copy of the exercise's
per-task loop (functional_forward with F.conv2d / F.batch_norm(training=True) / F.linear, one task
at a time, the query losses stacked and averaged, one backward at the end)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def functional_forward(x, p, depth):
    for i in range(depth):
        x = F.conv2d(x, p[f"blocks.{i}.conv.weight"], p.get(f"blocks.{i}.conv.bias"), padding=1)
        x = F.batch_norm(
            x,
            None,
            None,
            weight=p[f"blocks.{i}.norm.weight"],
            bias=p[f"blocks.{i}.norm.bias"],
            training=True,
        )
        x = F.max_pool2d(F.relu(x), kernel_size=2, stride=2)
    x = x.view(x.shape[0], -1)
    return F.linear(x, p["head.weight"], p["head.bias"])


def meta_step(model, batch, inner_steps, inner_lr, first_order):
    """Accumulates the meta-gradient of the mean query loss into the model's .grad."""
    params = dict(model.named_parameters())
    losses = []
    for t in range(batch["x_support"].shape[0]):
        fast = dict(params)
        for _ in range(inner_steps):
            loss = F.cross_entropy(
                functional_forward(batch["x_support"][t], fast, model.depth), batch["y_support"][t]
            )
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: w - inner_lr * g for (k, w), g in zip(fast.items(), grads)}
        losses.append(
            F.cross_entropy(
                functional_forward(batch["x_query"][t], fast, model.depth), batch["y_query"][t]
            )
        )
    meta_loss = torch.stack(losses).mean()
    meta_loss.backward()
    return meta_loss.detach()


def with_adam(cfg, first_order=None):
    """The exercise's whole meta-step on `cfg`'s Conv4 (a fixed inner lr, as the exercise: its
    learned rates off) with its Adam step at train.meta_lr: run(batch). `first_order` (default the
    config's) chooses the inner gradients."""
    from metadist.algorithms import model_of

    a = cfg.algo
    fo = a.first_order if first_order is None else first_order
    torch.manual_seed(0)
    model = model_of(cfg.model, a, (1, 28, 28), cfg.data.ways)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.meta_lr)

    def run(batch):
        opt.zero_grad(set_to_none=True)
        meta_step(model, batch, a.inner_steps, a.inner_lr, fo)
        opt.step()

    return run
