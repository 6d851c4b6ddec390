"""The exact reduction (metadist/exact.py and MetaStep's exact mode): the tree sum of chunk
gradients is bit-identical for every world size, in-process (the real multi-process runs are in
test_distributed.py)."""

import pytest
import torch

from metadist import config, exact
from metadist.step import from_config
from tests.conftest import OneProcess, model_for


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


def merged_over_ranks(cfg, batch, world: int, use) -> torch.Tensor:
    """What `world` ranks reduce to for 8 tasks: each rank's MetaStep (set up by `use(step)`) on its
    share, its dyadic blocks merged; the gradient and the votes (the padding varies with W)."""
    items = []
    for r in range(world):
        torch.manual_seed(0)
        step = from_config(
            cfg, model_for(cfg), OneProcess(r, world), 8 // world, say=lambda *a: None
        )
        use(step)
        share = {k: v[r * 8 // world : (r + 1) * 8 // world] for k, v in batch.items()}
        out = step.backward(False, share)
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
    "overrides",
    [
        [],
        ["algo.inner_steps=2", "algo.learn_inner_lr=layer"],
        ["algo.name=fomaml"],
        ["algo.tasks_per_chunk=2", "algo.strategy=loop"],
    ],
)
def test_a_ranks_blocks_do_not_depend_on_the_world_size(overrides):
    """Every rank's chunk gradients (the batch sliced as the reader slices it), summed by the tree:
    the meta-gradient of 1, 2, 4 and 8 ranks is the same to the last bit."""
    cfg = config.load(None, ["model.hidden=8", "train.meta_batch_size=8", *overrides])
    g = torch.Generator().manual_seed(0)
    batch = {
        "x_support": torch.rand(8, 5, 1, 28, 28, generator=g),
        "y_support": torch.arange(5).expand(8, -1),
        "x_query": torch.rand(8, 5, 1, 28, 28, generator=g),
        "y_query": torch.arange(5).expand(8, -1),
    }
    strategy = cfg.algo.strategy if cfg.algo.strategy != "auto" else "batched"
    sums = {}
    for world in (1, 2, 4, 8):
        if world > 8 // max(1, cfg.algo.tasks_per_chunk):
            continue
        sums[world] = merged_over_ranks(cfg, batch, world, lambda step: step.use_strategy(strategy))
    ref = sums.pop(1)
    assert ref.abs().sum() > 0
    for world, got in sums.items():
        assert torch.equal(got, ref), world


def test_exact_mode_checks_that_the_chunks_split_over_the_processes():
    cfg = config.load(None, ["model.hidden=8", "train.meta_batch_size=8", "algo.tasks_per_chunk=4"])
    with pytest.raises(config.ConfigError, match=r"algo\.tasks_per_chunk=4"):
        from_config(cfg, model_for(cfg), OneProcess(0, 4), 2, say=lambda *a: None)
    with pytest.raises(config.ConfigError, match="choose a divisor"):
        config.load(None, ["train.meta_batch_size=8", "algo.tasks_per_chunk=3"])


def eight_tasks(ways=5):
    g = torch.Generator().manual_seed(0)
    return {
        "x_support": torch.rand(8, ways, 1, 28, 28, generator=g),
        "y_support": torch.arange(ways).expand(8, -1),
        "x_query": torch.rand(8, ways, 1, 28, 28, generator=g),
        "y_query": torch.arange(ways).expand(8, -1),
    }


@pytest.mark.parametrize(
    "overrides",
    [[], ["algo.name=fomaml"], ["algo.inner_steps=2", "algo.learn_inner_lr=layer"]],
)
def test_a_tasks_gradient_in_groups_of_1_2_3_and_8_and_the_check_that_says_so(
    overrides, tmp_path, monkeypatch
):
    """Exact mode's per-task leaves: each task's gradient taken from groups of 1 (computed as two
    copies), 2, 3 and 8 tasks. Where the bits agree the check (metadist.strategy.exact_grouping)
    says per-task, and each equals the task's own gradient in float64 within float32's error;
    where they do not, it must say so (the run then falls back to chunks computed alone)."""
    from metadist import strategy
    from metadist.step import group_runner

    monkeypatch.setenv("METADIST_CACHE_DIR", str(tmp_path))
    cfg = config.load(None, ["model.hidden=8", "train.meta_batch_size=8", *overrides])
    torch.manual_seed(0)
    step = from_config(cfg, model_for(cfg), OneProcess(), 8, say=lambda *a: None)
    grads = group_runner(step, eight_tasks())
    by_size = {g: grads(g) for g in (1, 2, 3, 8)}
    same = all(torch.equal(by_size[8], v) for v in by_size.values())
    rec = strategy.exact_grouping({"test": overrides}, grads, [1, 2, 3, 8], say=lambda *a: None)
    assert rec["per_task"] == same and rec["groups"] == [1, 2, 3, 8]
    # and they are each task's gradient: float64 against float32, one task at a time
    step64 = from_config(cfg, model_for(cfg).double(), OneProcess(), 8, say=lambda *a: None)
    step64.model.load_state_dict({k: v.double() for k, v in step.model.state_dict().items()})
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in eight_tasks().items()}
    ref = group_runner(step64, batch64)(1)
    err = (by_size[8].double() - ref).abs().max() / ref.abs().max()
    assert ref.abs().sum() > 0 and err < 1e-4
    assert not torch.equal(by_size[8][0], by_size[8][1])  # tasks are told apart


@pytest.mark.parametrize("overrides", [[], ["algo.name=fomaml"]])
def test_per_task_leaves_give_the_same_bits_at_1_2_4_and_8_ranks(overrides):
    """Exact mode with per-task leaves, the ranks' shares of 8 tasks computed as one group each
    (8, 4, 2 tasks; 1 at 8 ranks): the meta-gradient is the same to the last bit, where this
    machine's kernels give a task the same gradient in every group (else the test is moot)."""
    from metadist.step import group_runner

    cfg = config.load(None, ["model.hidden=8", "train.meta_batch_size=8", *overrides])
    batch = eight_tasks()
    torch.manual_seed(0)
    step = from_config(cfg, model_for(cfg), OneProcess(), 8, say=lambda *a: None)
    grads = group_runner(step, batch)
    if not all(torch.equal(grads(8), grads(g)) for g in (1, 2, 4)):
        pytest.skip("this machine's kernels round a task differently by group size")
    sums = {}
    for world in (1, 2, 4, 8):

        def per_task(step, world=world):
            step.use_strategy("batched", per_task=True)
            assert step.reduction.layout == exact.layout(8, world) and step.s.group == 8 // world

        sums[world] = merged_over_ranks(cfg, batch, world, per_task)
    ref = sums.pop(1)
    assert ref.abs().sum() > 0
    for world, got in sums.items():
        assert torch.equal(got, ref), world


def test_the_group_sizes_checked_are_those_of_every_world_size():
    """The per-task check covers every group a rank may compute at any world size (its share
    B/W, cut by algo.tasks_per_chunk, and the remainder), so 1 and 2 processes decide alike (an
    84x84 RGB shape here gives a task other bits in a group of 4 than of 2: one world size
    alone would have said yes, the other no)."""
    from metadist.step import group_sizes

    assert group_sizes(32, 0) == [1, 2, 4, 8, 16, 32]
    assert group_sizes(8, 3) == [1, 2, 3]  # 8 = 3+3+2, 4 = 3+1, 2, 1
    assert group_sizes(12, 0) == [1, 2, 3, 4, 6, 12]
    assert group_sizes(1, 0) == [1]
