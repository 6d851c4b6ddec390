"""algo.compile (metadist/step/compute.py, metadist/step/plan.py): a chunk's meta-backward
compiled as one graph computes the eager step's maths (equal in float64), trains reproducibly, is
chosen by `auto` on a CPU where it pays, and refuses what it cannot compile in one line. Compiling
takes tens of seconds, so the compiling tests are slow ones."""

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
def test_compiled_training_runs_and_records_why(omniglot_dir, tmp_path, monkeypatch):
    """algo.compile=auto on a CPU, end to end, for a run long enough to try: the plan measures
    eager's tasks at once, compiles that chunk and measures it, keeps it (the bar for keeping it,
    COMPILE_PAYS, set to 0 here: this asserts the path, not a speed), says why, trains on the
    compiled step with inductor's artefacts in the per-machine cache; the same command again
    reads the decision from the cache and gives the same weights. (That compiled runs give the
    same weights at 1 and 2 processes is the long test below.)"""
    from metadist.machine import cache_dir
    from metadist.step import plan
    from metadist.train import train

    monkeypatch.setattr(plan, "COMPILE_MIN_SECONDS", 0.0)
    monkeypatch.setattr(plan, "COMPILE_PAYS", 0.0)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    base = small_overrides(
        omniglot_dir,
        tmp_path,
        **{"algo.compile": "auto", "algo.strategy": "auto", "train.steps": 2},
    )
    runs = []
    for name in ("a", "b"):
        said = []
        s = train(config.load(None, base + [f"run.name={name}"]), log=said.append)
        assert s["plan"]["compute"] == "compiled" and s["steps"] == 2
        assert any("fixed groups of" in x and "; compiled" in x for x in said), said
        runs.append((s["plan"]["why"], weights(tmp_path / "runs" / name)))
    (first, w1), (again, w2) = runs
    assert "algo.compile=auto: compiled" in first and "so compiled (measured now)" in first
    assert "so compiled (cached in" in again
    assert max_diff(w1, w2) == 0.0
    # inductor's artefacts in the per-machine cache (a folder per machine key: the run's threads)
    assert any(p.is_file() for p in cache_dir().glob("inductor-*/**/*"))


def test_compile_auto_is_eager_where_it_cannot_pay_or_is_not_asked(monkeypatch, tmp_path):
    """algo.compile=auto on a CPU tries the compiled chunk only for a run planned at least
    COMPILE_MIN_SECONDS long at eager's measured speed, keeps it at COMPILE_PAYS times eager's
    speed, and a compile that fails leaves the run eager, each said in one line; off, or a step
    that cannot compile, never tries."""
    from metadist.step import Ask, decide, plan

    monkeypatch.setenv("METADIST_CACHE_DIR", str(tmp_path / "cache"))
    clock = {"now": 0.0}
    monkeypatch.setattr(plan.time, "perf_counter", lambda: clock["now"])

    def chunk(eager_s, compiled_s, fails=None):
        calls = []

        def run(size, compiled=False):
            calls.append((size, compiled))
            if compiled and fails:
                raise fails
            if compiled and (size, True) not in calls[:-1]:
                clock["now"] += 60.0  # compiling
            clock["now"] += size * (compiled_s if compiled else eager_s)
            return size

        run.calls = calls
        return run

    def ask(steps, **kw):  # fast mode, 8 tasks a step: candidates 1, 2, 4, 8
        return Ask("auto", 0, "fast", "auto", 8, 1, 4, "cpu", steps=steps, **kw)

    long, short = 5000, 10  # 5000 * 8 tasks at 100 tasks/s: 400 s; 10 steps: 0.8 s
    run = chunk(0.01, 0.005)
    got = decide(ask(long), run, {"n": 1})
    assert got.compute == "compiled" and "2.00x" in got.why and "measured now" in got.why
    assert "its compile took 60 s" in got.why
    again = chunk(0.01, 0.005)
    got = decide(ask(long), again, {"n": 1})
    assert got.compute == "compiled" and "so compiled (cached in" in got.why
    assert not any(c for _, c in again.calls)  # nothing compiled: both answers were cached
    got = decide(ask(long), chunk(0.01, 0.0095), {"n": 2})
    assert got.compute == "eager" and "no gain" in got.why
    run = chunk(0.01, 0.005)
    got = decide(ask(short), run, {"n": 3})
    assert got.compute == "eager" and "algo.compile" not in got.why
    assert not any(c for _, c in run.calls)
    # a time budget bounds the run: 4 minutes at any speed is under COMPILE_MIN_SECONDS
    got = decide(ask(long, max_minutes=4.0), chunk(0.01, 0.005), {"n": 4})
    assert got.compute == "eager" and "algo.compile" not in got.why
    got = decide(ask(long), chunk(0.01, 0.005, RuntimeError("no C++ compiler\nmore")), {"n": 5})
    assert got.compute == "eager"
    assert "compiling failed here (RuntimeError: no C++ compiler), so eager" in got.why
    for kw in ({"compile": "off"}, {"cannot_compile": "DropBlock draws its masks"}):
        run = chunk(0.01, 0.005)
        got = decide(dataclasses.replace(ask(long), **kw), run, {"n": 6})
        assert got.compute == "eager" and not any(c for _, c in run.calls)


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
