"""The reference conv net: depth x [conv 3x3 (no bias) -> BatchNorm on batch statistics -> ReLU -> max-pool 2],
then a linear head of `ways` outputs. The module holds the meta-parameters (and, optionally, the
learned inner learning rates); training and evaluation never call its forward with fast weights:
`tasks_forward` runs many tasks at once from an explicit dict of weights, each task its own.

BatchNorm is written from mean and variance and never keeps running statistics: the same
behaviour in training and at test time (as the reference), and a second-order gradient that is
exact (torch 2.14's vmap over F.batch_norm gets it wrong).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dims=(0, 2, 3)) -> torch.Tensor:
    """Normalise with the batch's own statistics over `dims` (biased variance), then scale and shift.

    Folded into one per-channel scale and shift, so the full-size tensor meets a single addcmul:
    its double backward (most of second-order MAML's time on CPU) touches fewer large tensors.
    """
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    scale = weight * torch.rsqrt(var + EPS)
    return torch.addcmul(bias - mean * scale, x, scale)


class BatchStatNorm(nn.Module):
    """steps > 0: MAML++'s per-step BatchNorm weights and biases, (steps, C): inner step i (and the
    query after its update) uses row i; later steps (test-time adaptation) use the last row."""

    def __init__(self, channels: int, steps: int = 0):
        super().__init__()
        shape = (steps, channels) if steps else (channels,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        w, b = (self.weight[0], self.bias[0]) if self.weight.dim() == 2 else (self.weight, self.bias)
        return batch_norm(x, w.view(1, -1, 1, 1), b.view(1, -1, 1, 1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, bn_steps: int = 0):
        super().__init__()
        # no conv bias: BatchNorm subtracts the per-channel mean, so its true gradient is exactly 0.
        # What it would receive is rounding noise, which Adam scales into full steps whose sign
        # depends on summation order (world size); without it, runs of any size agree.
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = BatchStatNorm(cout, bn_steps)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)


def feature_side(depth: int, side: int = 28) -> int:
    for _ in range(depth):
        side //= 2
    return side


LR_PREFIX = "inner_lr."


def lr_key(name: str) -> str:
    """The name of the learned inner learning rate of parameter `name`."""
    return LR_PREFIX + name.replace(".", "_")


def is_lr(name: str) -> bool:
    return name.startswith(LR_PREFIX)


class ConvNet(nn.Module):
    """learn_lr: "none" (one fixed inner lr), "layer" (a learned inner lr per parameter tensor,
    shared by the inner steps), "layer_step" (one per tensor and inner step, MAML++'s LSLR:
    shape (steps, 1, ...)) or "element" (one per weight, Meta-SGD). The learned rates are
    meta-parameters like the weights (`inner_lr.*`), started at `lr_init`; the inner loop uses
    them in training and at test time (steps past `steps` use the last step's rate).
    per_step_bn: BatchNorm weights and biases per inner step (MAML++'s BNWB), (steps, C)."""

    def __init__(self, ways: int, hidden: int = 64, depth: int = 4, in_channels: int = 1, side: int = 28,
                 learn_lr: str = "none", lr_init: float = 0.4, steps: int = 1, per_step_bn: bool = False):
        super().__init__()
        self.ways, self.hidden, self.depth, self.learn_lr = ways, hidden, depth, learn_lr
        bn_steps = max(1, steps) if per_step_bn else 0
        self.blocks = nn.Sequential(*[Block(in_channels if i == 0 else hidden, hidden, bn_steps) for i in range(depth)])
        self.head = nn.Linear(hidden * feature_side(depth, side) ** 2, ways)
        if learn_lr != "none":
            def shape(v):
                if learn_lr == "element":
                    return v.shape
                return ((max(1, steps),) if learn_lr == "layer_step" else ()) + (1,) * v.dim()
            # per-step BatchNorm weights are not adapted in the inner loop: they need no rate
            shapes = {k: shape(v) for k, v in self.named_parameters() if not (per_step_bn and ".norm." in k)}
            # registered as "inner_lr.<name with _ for .>", i.e. lr_key(name)
            self.inner_lr = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(torch.full(s, float(lr_init)))
                                              for k, s in shapes.items()})

    def forward(self, x):          # x: (n, C, H, W) -> logits (n, ways)
        return self.head(self.blocks(x).flatten(1))

    def head_names(self) -> tuple[str, ...]:
        return ("head.weight", "head.bias")


def tasks_forward(params: dict[str, torch.Tensor], x: torch.Tensor, depth: int, native_norm: bool = False,
                  step: int = 0) -> torch.Tensor:
    """Run T tasks at once, task t with its own weights params[k][t] (the ConvNet's names).
    `step`: the inner step, which picks the row of per-step BatchNorm weights (if the net has them).

    Tasks are folded into channels: (n, T*C, H, W) with grouped convolutions, so each task keeps
    its own BatchNorm statistics. x: (T, n, C, H, W) -> logits (T, n, ways).
    native_norm: use torch's fused batch-norm kernel; right and faster where no second-order
    graph goes through it (first order, evaluation), so only the strategies choose it there.
    """
    T, n = x.shape[:2]
    h = x.transpose(0, 1).reshape(n, T * x.shape[2], *x.shape[3:])
    for i in range(depth):
        w = params[f"blocks.{i}.conv.weight"]
        cout = w.shape[1]
        h = F.conv2d(h, w.reshape(T * cout, *w.shape[2:]), None, padding=1, groups=T)
        g, beta = params[f"blocks.{i}.norm.weight"], params[f"blocks.{i}.norm.bias"]
        if g.dim() == 3:                                   # per-step BatchNorm: (T, steps, C)
            row = min(step, g.shape[1] - 1)
            g, beta = g[:, row], beta[:, row]
        if native_norm:
            h = F.batch_norm(h, None, None, g.reshape(-1), beta.reshape(-1), training=True, eps=EPS)
        else:
            h = batch_norm(h, g.reshape(1, T * cout, 1, 1), beta.reshape(1, T * cout, 1, 1))
        h = F.max_pool2d(F.relu(h), 2)
    h = h.reshape(n, T, -1).transpose(0, 1)                                # (T, n, features)
    return torch.baddbmm(params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2))
