"""The exact reduction (metadist/step/reduce.py and MetaStep's exact mode): the tree sum of the
fixed groups' gradients is bit-identical for every world size that splits them, in-process (the
real multi-process runs are in test_distributed.py). Nothing here depends on how this machine's
kernels round: the same groups are computed at every world size."""

import dataclasses

import pytest
import torch

from metadist import config
from metadist.data.synthetic import random_batch
from metadist.distributed import OneProcess
from metadist.step import MetaStep, Plan, StepSettings, Trainable
from metadist.step import reduce as exact
from metadist.step.plan import exact_worlds
from tests.conftest import model_for


def step_for(cfg, dist, local: int, at_once: int) -> MetaStep:
    """The exact step of `cfg` with fixed groups of `at_once` tasks, for rank dist.rank."""
    plan = Plan.fixed(at_once, "exact", cfg.train.meta_batch_size)
    settings = StepSettings.of(cfg.train, cfg.algo, cfg.seed, local, dist.device)
    return MetaStep(
        Trainable.of(cfg.train, cfg.algo, cfg.data.ways, model_for(cfg), dist.device),
        dist,
        plan,
        settings,
    )


def tree_reference(vectors, lo, size):
    """The canonical tree, written recursively: node [lo, lo+size) over the K = len(vectors)
    leaves."""
    if size == 1:
        return vectors[lo]
    half = size // 2
    left = tree_reference(vectors, lo, half)
    if lo + half >= len(vectors):
        return left
    return left + tree_reference(vectors, lo + half, half)


def sum_as(world, vectors):
    """What `world` ranks compute: each its blocks with TreeSum, then one merge of all blocks."""
    k = len(vectors)
    items = []
    for r, mine in enumerate(exact.layout(k, world)):
        tree = exact.TreeSum(r * (k // world))
        for i in range(r * (k // world), (r + 1) * (k // world)):
            tree.push(vectors[i])
        assert [(a, s) for a, s, _ in tree.blocks()] == mine
        items += tree.blocks()
    return exact.merge(items)


def merged_over_ranks(cfg, batch, world: int, at_once: int) -> torch.Tensor:
    """What `world` ranks reduce to for 8 tasks in groups of `at_once`: each rank's MetaStep on
    its share, its dyadic blocks merged; the gradient and the votes (the padding varies with W)."""
    items = []
    for r in range(world):
        torch.manual_seed(0)
        step = step_for(cfg, OneProcess(r, world), 8 // world, at_once)
        share = {k: v[r * 8 // world : (r + 1) * 8 // world] for k, v in batch.items()}
        out = step.local(False, share)
        items += [(a, s, v) for (a, s), v in zip(step.reduction.layout[r], out[2:])]
    return exact.merge(items)[: step.reduction.n_grad + 2]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
def test_tree_sum_is_bit_identical_for_every_world_size(k):
    g = torch.Generator().manual_seed(k)
    # values of very different magnitudes: any change of summation order shows in the bits
    vectors = [
        torch.randn(257, generator=g) * 10.0 ** torch.randint(-6, 6, (257,), generator=g)
        for _ in range(k)
    ]
    p2 = 1 << (k - 1).bit_length()
    ref = tree_reference(vectors, 0, p2)
    for world in (w for w in range(1, k + 1) if k % w == 0):
        got = sum_as(world, vectors)
        assert torch.equal(got, ref), (k, world)
    # it is a sum: within float32 rounding (k additions) of the float64 one, element by element
    stacked = torch.stack(vectors).double()
    assert ((ref.double() - stacked.sum(0)).abs() <= k * 2.0**-23 * stacked.abs().sum(0)).all()
    # and another order really does change bits (the test can fail for its reason)
    if k >= 4:
        assert not torch.equal(ref, torch.stack(vectors).sum(0)) or not torch.equal(
            ref, sum(reversed(vectors))
        )


def test_blocks_tile_a_range_with_maximal_dyadic_blocks():
    assert exact.blocks(0, 8) == [(0, 8)]
    assert exact.blocks(0, 6) == [(0, 4), (4, 2)]
    assert exact.blocks(3, 8) == [(3, 1), (4, 4)]
    assert exact.blocks(2, 7) == [(2, 2), (4, 2), (6, 1)]
    for lo in range(0, 20):
        for hi in range(lo + 1, 21):
            b = exact.blocks(lo, hi)
            assert sum(s for _, s in b) == hi - lo and all(a % s == 0 for a, s in b)


@pytest.mark.parametrize(
    ("overrides", "at_once"),
    [
        ([], 2),
        (["algo.inner_steps=2", "algo.learn_inner_lr=layer"], 2),
        (["algo.name=fomaml"], 4),
        ([], 1),
    ],
)
def test_fixed_groups_give_the_same_bits_at_every_world_size_that_splits_them(overrides, at_once):
    """Every rank's groups (the batch sliced as the reader slices it), summed by the tree: the
    meta-gradient of 1, 2, 4 (and 8) ranks is the same to the last bit, on any kernels, because
    every group is the same computation at every world size."""
    cfg = config.load(None, ["model.hidden=8", "train.meta_batch_size=8", *overrides])
    batch = eight_tasks()
    sums = {w: merged_over_ranks(cfg, batch, w, at_once) for w in exact_worlds(8, at_once)}
    ref = sums.pop(1)
    assert ref.abs().sum() > 0 and len(sums) >= 1
    for world, got in sums.items():
        assert torch.equal(got, ref), world


def test_exact_mode_refuses_a_world_size_that_does_not_split_its_groups():
    cfg = config.load(None, ["model.hidden=8", "train.meta_batch_size=8"])
    with pytest.raises(config.ConfigError, match=r"launch 1, 2 processes"):
        step_for(cfg, OneProcess(0, 4), 2, 4)
    with pytest.raises(config.ConfigError, match="choose a divisor"):
        config.load(None, ["train.meta_batch_size=8", "algo.tasks_per_chunk=3"])


def eight_tasks(ways=5):
    return random_batch(8, ways)


def test_the_groups_exact_mode_chooses_leave_enough_for_its_processes():
    """Without algo.tasks_per_chunk: the largest group that leaves max(train.exact_processes,
    the launch's processes) groups; `auto` measures only such groups; the world sizes follow."""
    from metadist.step import Ask, decide
    from metadist.step.plan import candidates

    def ask(b, world=1, processes=4, strategy="batched"):
        return Ask(strategy, 0, "exact", "off", b, world, processes, "cpu")

    assert decide(ask(8), None, {}).at_once == 2
    assert decide(ask(32), None, {}).at_once == 8
    assert decide(ask(32), None, {}).worlds == (1, 2, 4)
    assert decide(ask(32, world=8), None, {}).at_once == 4
    assert decide(ask(3), None, {}).at_once == 1
    assert decide(ask(64, processes=2), None, {}).at_once == 32
    assert candidates(ask(32)) == [1, 2, 4, 8] and candidates(ask(8)) == [1, 2]
    fast = dataclasses.replace(ask(32), reduce="fast")
    assert candidates(fast) == [1, 2, 4, 8, 16] and decide(fast, None, {}).at_once == 0
