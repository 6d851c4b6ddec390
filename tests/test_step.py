"""The meta-step (metadist/step/meta_step.py): the schedule, gradient clipping and derivative-order
annealing."""

import math

import pytest
import torch

from metadist import config
from metadist.data.synthetic import random_batch
from metadist.distributed import OneProcess
from metadist.schedule import Schedule
from metadist.step import MetaStep, Plan, StepSettings, Trainable
from tests.conftest import model_for


def test_warmup_then_cosine_schedule_owns_the_step_count():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = Schedule(opt, 10, "cosine", warmup=4)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(4) == 1.0 and s.factor(10) == pytest.approx(0.0, abs=1e-12)
    assert s.factor(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    const = Schedule(opt, 10, "constant", warmup=2)
    assert [const.factor(i) for i in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    # a budget fixes another count: the cosine (after the held probe) ends there, and the state
    # keeps it
    held = Schedule(opt, 100, "cosine", hold=5)
    assert held.total == 100 and held.factor(5) == 1.0
    held.fix(25)
    assert (
        held.total == 25
        and held.factor(25) == pytest.approx(0.0, abs=1e-12)
        and held.factor(3) == 1.0
    )
    again = Schedule(opt, 100, "cosine", hold=5)
    again.load_state_dict(held.state_dict())
    assert again.total == 25


def _batch(tasks=4, ways=5):
    return random_batch(tasks, ways)


def _step(*overrides):
    cfg = config.load(None, ["model.hidden=8", "train.meta_batch_size=4", *overrides])
    torch.manual_seed(0)
    model = model_for(cfg)
    dist, plan = OneProcess(), Plan(0, "fast")
    settings = StepSettings.of(cfg.train, cfg.algo, cfg.seed, 4, dist.device)
    step = MetaStep(
        Trainable.of(cfg.train, cfg.algo, cfg.data.ways, model, dist.device), dist, plan, settings
    )
    return step, model


def test_grad_clip_bounds_the_meta_gradient_norm():
    step, model = _step("train.grad_clip=0.01")
    _, _, norm, _ = step(0, _batch(), lambda: torch.zeros(3))
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    # it was well above, and is clipped
    assert norm > 0.1 and clipped == pytest.approx(0.01, rel=1e-4)
    step, model = _step()  # 0 = off
    _, _, norm, _ = step(0, _batch(), lambda: torch.zeros(3))
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() == pytest.approx(
        norm.item(), rel=1e-6
    )


def test_first_order_steps_anneal_the_derivative_order():
    """With algo.first_order_steps=2, steps 0 and 1 take the first-order meta-gradient and step 2
    the second-order one: each equals the plain algorithm of that order on the same weights."""

    def grads_at(step_index, *overrides):
        step, model = _step("train.meta_lr=1e-9", *overrides)
        # keep the weights: compare gradients only
        step.optimizer.param_groups[0]["lr"] = 0.0
        step(step_index, _batch(), lambda: torch.zeros(3))
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    annealed = [grads_at(s, "algo.first_order_steps=2") for s in (0, 1, 2)]
    first, second = grads_at(0, "algo.first_order=true"), grads_at(0)
    assert not torch.allclose(first, second, rtol=1e-3)
    assert torch.equal(annealed[0], first) and torch.equal(annealed[1], first)
    assert torch.equal(annealed[2], second)
