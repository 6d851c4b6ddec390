"""What every backbone shares: BatchNorm on batch statistics (plain and per inner step), the
learned inner learning rates, the per-task pieces of the tasks-at-once forward (tasks folded into
channels: grouped convolutions, a BatchNorm per task), and `Backbone`, the base that owns the
head, the learned rates and `tasks_forward`.

BatchNorm is written from mean and variance and never keeps running statistics: the same
behaviour in training and at test time (as the reference), and a second-order gradient that is
exact (torch 2.14's vmap over F.batch_norm gets it wrong).
"""

from __future__ import annotations

import functools
import time
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
LR_PREFIX = "inner_lr."


def batch_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dims=(0, 2, 3)
) -> torch.Tensor:
    """Normalise with the batch's own statistics over `dims` (biased variance), then scale and
    shift.

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
        w, b = (
            (self.weight[0], self.bias[0]) if self.weight.dim() == 2 else (self.weight, self.bias)
        )
        return batch_norm(x, w.view(1, -1, 1, 1), b.view(1, -1, 1, 1))


class _MaxPool2(torch.autograd.Function):
    """F.max_pool2d(x, 2) on a contiguous (N, C, H, W) tensor, its forward through torch's
    channels-last kernel: the same values and the same argmax indices (a max involves no
    rounding), then the same backward kernel as F.max_pool2d's (and so the same double backward),
    bit for bit. On some CPUs (an AMD EPYC Zen 5 here) the plain NCHW forward kernel runs 3-5x
    slower than the channels-last one plus the two layout copies."""

    @staticmethod
    def forward(ctx, x):
        y, idx = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), [2, 2], [2, 2]
        )
        idx = idx.contiguous()
        ctx.save_for_backward(x, idx)
        return y.contiguous()

    @staticmethod
    def backward(ctx, gy):
        x, idx = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            gy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
        )


@functools.cache
def channels_last_pool_is_faster() -> bool:
    """Which 2x2 max-pool forward this CPU runs faster, timed once per process on a block's
    worth of activations (both give the same bits, so the choice changes no result)."""
    x = torch.rand(8, 256, 28, 28)

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    with torch.no_grad():
        return best(_MaxPool2.apply) < best(lambda v: F.max_pool2d(v, 2))


# below this many elements the two layout copies and the Python-level backward of _MaxPool2 cost
# more than the faster kernel saves (measured on an Intel Xeon and an AMD EPYC: (5, 64, 7, 7),
# 15,680 elements, is a little faster with F.max_pool2d; (5, 64, 14, 14) 1.4x faster with _MaxPool2)
MIN_CHANNELS_LAST_POOL = 32768


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling, stride 2 (F.max_pool2d(x, 2)), bit for bit; on a CPU by whichever
    forward kernel is faster there (_MaxPool2). A graph being traced (torch.export, ONNX,
    inductor) takes F.max_pool2d: its batch size is a symbol, not a number to compare."""
    if (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.numel() >= MIN_CHANNELS_LAST_POOL
        and x.is_contiguous()
        and channels_last_pool_is_faster()
    ):
        return _MaxPool2.apply(x)
    return F.max_pool2d(x, 2)


def lr_key(name: str) -> str:
    """The name of the learned inner learning rate of parameter `name`."""
    return LR_PREFIX + name.replace(".", "_")


def is_lr(name: str) -> bool:
    return name.startswith(LR_PREFIX)


def fold(x: torch.Tensor) -> torch.Tensor:
    """(T, n, C, H, W) -> (n, T*C, H, W): task t's channels are [t*C, (t+1)*C)."""
    T, n = x.shape[:2]
    return x.transpose(0, 1).reshape(n, T * x.shape[2], *x.shape[3:])


def task_conv(h: torch.Tensor, w: torch.Tensor, padding: int = 1) -> torch.Tensor:
    """Each task's convolution with its own weights: h (n, T*Cin, H, W), w (T, Cout, Cin, k, k)."""
    T = w.shape[0]
    return F.conv2d(h, w.reshape(T * w.shape[1], *w.shape[2:]), None, padding=padding, groups=T)


def masked_batch_norm(x: torch.Tensor, weight, bias, mask: torch.Tensor) -> torch.Tensor:
    """batch_norm with the statistics of the rows where `mask` (n, channels, 1, 1) is 1 alone:
    the padding rows of variable episodes change nothing (their outputs are never read)."""
    count = mask.sum(0, keepdim=True) * (x.shape[2] * x.shape[3])
    mean = (x * mask).sum((0, 2, 3), keepdim=True) / count
    var = ((x - mean).square() * mask).sum((0, 2, 3), keepdim=True) / count
    scale = weight * torch.rsqrt(var + EPS)
    return torch.addcmul(bias - mean * scale, x, scale)


def fold_mask(mask: torch.Tensor, channels: int) -> torch.Tensor:
    """(T, n) bool, the real (not padding) images of each task -> (n, T*channels, 1, 1) float,
    matching fold()'s channels."""
    return mask.t().repeat_interleave(channels, dim=1)[..., None, None].float()


def task_norm(
    h: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    step: int = 0,
    native: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each task's BatchNorm (its own statistics and weights): h (n, T*C, H, W), g and b (T, C), or
    (T, steps, C) per inner step (row `step`, the last for later steps). native: torch's fused
    kernel, right and faster where no second-order graph goes through it. mask (T, n): a padded
    batch's real images (variable episodes), the only ones the statistics see."""
    if g.dim() == 3:
        row = min(step, g.shape[1] - 1)
        g, b = g[:, row], b[:, row]
    if mask is not None:
        m = fold_mask(mask, h.shape[1] // mask.shape[0]).to(h.dtype)
        return masked_batch_norm(h, g.reshape(1, -1, 1, 1), b.reshape(1, -1, 1, 1), m)
    if native:
        return F.batch_norm(h, None, None, g.reshape(-1), b.reshape(-1), training=True, eps=EPS)
    return batch_norm(h, g.reshape(1, -1, 1, 1), b.reshape(1, -1, 1, 1))


@dataclass(frozen=True)
class InnerRates:
    """The inner learning rates a backbone carries as meta-parameters: `learn` none | layer |
    layer_step | element (see Backbone), started at `init`; `steps` inner steps (the per-step
    rates' and BatchNorm weights' rows); `per_step_bn`: MAML++'s per-step BatchNorm weights."""

    learn: str = "none"
    init: float = 0.4
    steps: int = 1
    per_step_bn: bool = False

    @property
    def bn_steps(self) -> int:
        """Rows of each BatchNorm weight: the inner steps with per-step BatchNorm, else 0 (one
        row)."""
        return max(1, self.steps) if self.per_step_bn else 0


class Backbone(nn.Module, metaclass=ABCMeta):
    """A backbone is a body (`features`, plain; `tasks_features`, many tasks at once, each with
    its own weights) and a linear head of `ways` outputs, built by `finish()` after the body.

    rates.learn: "none" (one fixed inner lr), "layer" (a learned inner lr per parameter tensor,
    shared by the inner steps), "layer_step" (one per tensor and inner step, MAML++'s LSLR: shape
    (steps, 1, ...)) or "element" (one per weight, Meta-SGD). The learned rates are
    meta-parameters like the weights (`inner_lr.*`), started at `rates.init`; the inner loop uses
    them in training and at test time (steps past `steps` use the last step's rate). Per-step
    BatchNorm weights are meta-learned only: they get no rate (`is_norm` says which they are)."""

    feature_dim: int

    def finish(self, ways: int, rates: InnerRates = InnerRates()) -> None:
        learn_lr, lr_init, steps, per_step_bn = (
            rates.learn,
            rates.init,
            rates.steps,
            rates.per_step_bn,
        )
        self.ways, self.learn_lr = ways, learn_lr
        self.head = nn.Linear(self.feature_dim, ways)
        if learn_lr != "none":

            def shape(v):
                if learn_lr == "element":
                    return v.shape
                return ((max(1, steps),) if learn_lr == "layer_step" else ()) + (1,) * v.dim()

            shapes = {
                k: shape(v)
                for k, v in self.named_parameters()
                if not (per_step_bn and self.is_norm(k))
            }
            # registered as "inner_lr.<name with _ for .>", i.e. lr_key(name)
            self.inner_lr = nn.ParameterDict(
                {
                    k.replace(".", "_"): nn.Parameter(torch.full(s, float(lr_init)))
                    for k, s in shapes.items()
                }
            )

    @abstractmethod
    def is_norm(self, name: str) -> bool:
        """Whether parameter `name` is a BatchNorm weight or bias."""

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, feature_dim), one set of weights."""

    def forward(self, x):  # (n, C, H, W) -> logits (n, ways)
        return self.head(self.features(x))

    def head_names(self) -> tuple[str, ...]:
        """The parameters of the head: what ANIL adapts."""
        return ("head.weight", "head.bias")

    @abstractmethod
    def tasks_features(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        step: int = 0,
        native_norm: bool = False,
        rng: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (T, n, C, H, W), params[k] (T, *shape): every task with its own weights -> (T, n,
        feature_dim). rng: the generator of random layers (DropBlock) in meta-training; None: none
        drop. mask (T, n): a padded batch's real images (variable episodes; None: all real)."""

    def tasks_forward(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        step: int = 0,
        native_norm: bool = False,
        rng: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run T tasks at once, task t with its own weights params[k][t]; `step` is the inner step
        (per-step BatchNorm weights). x: (T, n, C, H, W) -> logits (T, n, ways)."""
        h = self.tasks_features(params, x, step, native_norm, rng, mask)
        return torch.baddbmm(
            params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2)
        )
