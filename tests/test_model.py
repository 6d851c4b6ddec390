"""The backbones: the folded many-task forward equals the module run with explicit weights (Conv4
and ResNet-12), the written-out BatchNorm equals torch's, the table and the pretrained start."""

import pytest
import torch
import torch.nn.functional as F

from metadist.algorithms.core import per_task
from metadist.models.common import batch_norm
from metadist.models.conv4 import ConvNet
from metadist.models.resnet12 import ResNet12


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_module_runs_with_explicit_weights_through_functional_call(backbone):
    """The model is a plain nn.Module: functional_call with explicit weights equals the folded
    per-task forward with those weights (and torch's fused batch-norm kernel, what the loop and
    evaluation use, agrees)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    if backbone == "conv4":
        model, x = (
            ConvNet(3, hidden=4, depth=2, side=8).double(),
            torch.rand(4, 6, 1, 8, 8, dtype=torch.float64),
        )
    else:
        model, x = (
            ResNet12(3, widths=(3, 4, 5, 6), in_channels=3, side=16).double(),
            torch.rand(4, 6, 3, 16, 16, dtype=torch.float64),
        )
    params = {k: v + 0.01 * torch.randn_like(v) for k, v in model.named_parameters()}
    direct = torch.stack([functional_call(model, params, (x[t],)) for t in range(4)])
    for native in (False, True):
        folded = model.tasks_forward(per_task(params, 4), x, native_norm=native)
        assert torch.allclose(direct, folded, rtol=1e-10, atol=1e-12), native


def test_written_out_batch_norm_equals_torchs():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    ours = batch_norm(x, w.view(1, -1, 1, 1), b.view(1, -1, 1, 1))
    assert torch.allclose(
        ours, F.batch_norm(x, None, None, w, b, training=True), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 4, 7, 9), (20, 64, 28, 28)])
def test_channels_last_max_pool_equals_torchs_bit_for_bit(dtype, shape):
    """The max pool whose forward runs through the channels-last kernel (models.common) gives
    F.max_pool2d's output, gradient and second-order gradient bit for bit, ties included (ReLU's
    zeros and repeated values tie in most windows), odd sizes dropping the last row/column."""
    from metadist.models.common import _MaxPool2

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(-3, 4, shape, generator=g).to(dtype)  # many ties
    x = torch.where(x < 0, torch.zeros_like(x), x) + 0.0  # ReLU-like zeros
    x[0, 0, :2, :2] = float("nan")
    w = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g, dtype=dtype)
    outs = []
    for pool in (lambda v: F.max_pool2d(v, 2), _MaxPool2.apply):
        a = x.clone().requires_grad_(True)
        y = pool(a * a)  # the input's own gradient path makes the double backward non-trivial
        (gx,) = torch.autograd.grad((y * w).nansum(), a, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * gx).nansum(), a)
        outs.append((y.detach(), gx.detach(), ggx))
        assert y.is_contiguous()
    for ref, got in zip(outs[0], outs[1]):
        assert ref.shape == got.shape
        assert torch.equal(ref.nan_to_num(7.5), got.nan_to_num(7.5))
