"""The conv net: the folded many-task forward equals the module run with explicit weights, and the
written-out BatchNorm equals torch's."""
import torch
import torch.nn.functional as F

from metadist.algorithms.core import per_task
from metadist.model import ConvNet, batch_norm, tasks_forward


def test_module_runs_with_explicit_weights_through_functional_call():
    """The model is a plain nn.Module: functional_call with explicit weights equals the folded
    per-task forward with those weights."""
    from torch.func import functional_call
    torch.manual_seed(0)
    model = ConvNet(3, hidden=4, depth=2, side=8).double()
    x = torch.rand(4, 6, 1, 8, 8, dtype=torch.float64)
    params = {k: v + 0.01 for k, v in model.named_parameters()}
    direct = torch.stack([functional_call(model, params, (x[t],)) for t in range(4)])
    folded = tasks_forward(per_task(params, 4), x, model.depth)
    assert torch.allclose(direct, folded, rtol=1e-10, atol=1e-12)




def test_written_out_batch_norm_equals_torchs():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    ours = batch_norm(x, w.view(1, -1, 1, 1), b.view(1, -1, 1, 1))
    assert torch.allclose(ours, F.batch_norm(x, None, None, w, b, training=True), rtol=1e-10, atol=1e-12)
