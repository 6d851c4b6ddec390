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
