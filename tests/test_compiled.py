"""algo.compile=on (metadist/step/compute.py): a chunk's meta-backward compiled as one graph
computes the eager step's maths (equal in float64), trains reproducibly, and refuses what it cannot
compile in one line. Compiling takes tens of seconds, so the compiling tests are slow ones."""

import dataclasses
import json

import pytest
import torch

from metadist import config
from metadist.algorithms import maml
from metadist.algorithms.core import Inner
from metadist.data.synthetic import random_batch
from metadist.models.common import InnerRates
from metadist.models.conv4 import ConvNet
from metadist.step.compute import Compiled, Eager, meta_backward
from tests.conftest import launch, max_diff, run_cli, small_overrides, weights


def _batch(tasks: int, dtype) -> dict:
    return random_batch(tasks, 5, 2, 1, dtype=dtype)


def _grads(model, batch, inner, compiled) -> torch.Tensor:
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    kind = Compiled if compiled else Eager
    loss, acc = meta_backward(
        lambda f, p, c: maml.task_losses(f, p, c, inner),
        compiled or kind(model, not inner.first_order, 2),
        params,
        batch,
        0.25,
    )
    g = torch.cat([p.grad.flatten() for p in params.values()] + [loss.reshape(1), acc.reshape(1)])
    model.zero_grad(set_to_none=True)
    return g


@pytest.mark.slow
def test_the_compiled_chunk_equals_the_eager_one_in_float64():
    """Second order, 2 inner steps, learned per-layer rates, two chunks of 2 tasks accumulated:
    gradients, loss and accuracy equal the eager step's to float64 rounding; in float32 they are
    as close to float64 as the eager step's own float32 (a bound from the eager step's error).
    Two blocks, not four: compiling the double backward is what takes the time, and every block
    is the same graph."""
    inner = Inner(2, 0.4)
    torch.manual_seed(0)
    model = ConvNet(5, hidden=8, depth=2, rates=InnerRates("layer", 0.4, 2)).double()
    b64 = _batch(4, torch.float64)
    eager64 = _grads(model, b64, inner, None)
    compiled64 = _grads(model, b64, inner, Compiled(model, True, 2))
    assert (compiled64 - eager64).abs().max() <= 1e-10 * eager64.abs().max()
    m32 = model.float()
    b32 = {k: v.float() if v.is_floating_point() else v for k, v in b64.items()}
    chunks = Compiled(m32, True, 2)
    eager_err = (_grads(m32, b32, inner, None).double() - eager64).abs().max()
    compiled32 = _grads(m32, b32, inner, chunks)
    assert (compiled32.double() - eager64).abs().max() <= 8 * eager_err
    # the second call reuses the graph compiled for this shape
    assert len(chunks.graphs) == 1 and torch.equal(_grads(m32, b32, inner, chunks), compiled32)


@pytest.mark.slow
def test_compiled_training_runs_and_records_why(omniglot_dir, tmp_path):
    """A compiled run end to end with the plan deciding the rest (algo.strategy=auto): it trains
    on the compiled step and says so. (That compiled runs give the same weights again, at 1 and
    2 processes, is the long test below.)"""
    from metadist.train import train

    base = small_overrides(
        omniglot_dir,
        tmp_path,
        **{"algo.compile": "on", "algo.strategy": "auto", "train.steps": 2},
    )
    said = []
    s = train(config.load(None, base + ["run.name=a"]), log=said.append)
    assert s["plan"]["compute"] == "compiled" and s["steps"] == 2
    assert any("fixed groups of 2 task(s)" in x and "; compiled" in x for x in said), said


@pytest.mark.long
def test_compiled_exact_runs_are_the_same_at_1_and_2_processes(omniglot_dir, tmp_path):
    """Exact mode under compile computes each fixed group through the same graph: 1 and 2
    processes (accelerate launch, gloo, one thread each) give the same weights, bit for bit, so
    compiled training is reproducible across processes and world sizes."""
    args = small_overrides(
        omniglot_dir,
        tmp_path,
        **{
            "algo.compile": "on",
            "train.reduce": "exact",
            "algo.tasks_per_chunk": 2,
            "train.threads": 1,
            "train.steps": 3,
            "train.val_every": 50,
        },
    )
    r = run_cli("prepare", *args)
    assert r.returncode == 0, r.stderr
    for n in (1, 2):
        r = launch(n, args + [f"run.name=p{n}"])
        assert r.returncode == 0, r.stderr[-3000:]
        assert "4 fixed groups of 2 task(s)" in r.stdout and "; compiled" in r.stdout
    assert max_diff(weights(tmp_path / "runs" / "p1"), weights(tmp_path / "runs" / "p2")) == 0.0
    for n in (1, 2):
        summary = json.loads((tmp_path / "runs" / f"p{n}" / "summary.json").read_text())
        assert summary["plan"]["compute"] == "compiled", summary["plan"]


@pytest.mark.parametrize(
    ("cannot", "device"),
    [("DropBlock draws its masks on the host each step", "cpu"), ("variable episodes", "cuda")],
)
def test_what_cannot_be_compiled_is_refused_in_one_line_on_either_device(cannot, device):
    """One place decides: the plan refuses algo.compile=on where the step cannot be compiled
    (inductor on a CPU, a CUDA graph on a GPU), and algo.compile=auto falls back to eager."""
    from metadist.step import Ask, decide

    ask = Ask("batched", 2, "exact", "on", 8, 1, 4, device, cannot_compile=cannot)
    with pytest.raises(config.ConfigError, match=cannot) as e:
        decide(ask, None, {})
    assert "algo.compile=on" in str(e.value) and "\n" not in str(e.value)
    assert decide(dataclasses.replace(ask, compile="auto"), None, {}).compute == "eager"
    assert decide(dataclasses.replace(ask, cannot_compile=""), None, {}).compute == (
        "compiled" if device == "cpu" else "graph"
    )


def test_a_dropblock_backbone_under_compile_is_one_line_at_start(omniglot_dir, tmp_path):
    extra = {"algo.compile": "on", "model.dropblock": 0.1, "model.backbone": "resnet12"}
    r = run_cli("train", *small_overrides(omniglot_dir, tmp_path, **extra))
    assert r.returncode == 2 and "algo.compile=on: DropBlock" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
