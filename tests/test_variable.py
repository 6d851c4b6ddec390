"""Variable episodes (Meta-Dataset's sampler): every rule checked exactly on every sampled
episode, against the sampler's own random draws recomputed here by the paper's formulas; the
distribution of ways within a bound derived from the number of episodes; images drawn at random;
deterministic from (seed, split, index)."""

import json
import math

import numpy as np
import pytest

from metadist.config import VariableConfig
from metadist.data.episodes import (
    VARIABLE_COLUMNS,
    check_variable_split,
    episode_rng,
    sample_variable_episode,
)
from metadist.data.sources import DataError

ROTATIONS = [0, 1, 2, 3]


class Recorded:
    """A real numpy Generator whose draws are kept, so a test can redo the sampler's arithmetic
    from them."""

    def __init__(self, rng):
        self.rng, self.calls = rng, []

    def __getattr__(self, name):
        fn = getattr(self.rng, name)

        def call(*args, **kw):
            out = fn(*args, **kw)
            self.calls.append((name, args, kw, out))
            return out

        return call


def expected(sizes, groups, v, calls):
    """Meta-Dataset's rules (data/sampling.py), written from the paper's description, applied to
    the sampler's draws in order: group?, ways, classes, beta, log-weights, turns, images."""
    calls = list(calls)
    pool = np.arange(len(sizes))
    if groups is not None:
        name, args, _, g = calls.pop(0)
        members = sorted(set(groups))
        assert name == "integers" and args == (len(members),)
        pool = np.flatnonzero(np.asarray(groups) == members[g])
    name, args, _, ways = calls.pop(0)
    assert name == "integers" and args == (v.min_ways, min(v.max_ways, len(pool)) + 1)
    assert v.min_ways <= ways <= min(v.max_ways, len(pool))
    _, _, _, classes = calls.pop(0)
    assert len(set(classes.tolist())) == ways and set(classes.tolist()) <= set(pool.tolist())
    n = np.asarray(sizes)[classes]
    queries = min(v.max_query, int(n.min()) // 2)
    remaining = n - queries
    _, _, _, beta = calls.pop(0)
    assert 0 <= beta < 1
    # ceil(beta' * contribution), beta' in (0, 1], written as Meta-Dataset's code does
    support = min(
        v.max_support,
        sum(math.floor(beta * min(v.max_support_per_class, r) + 1) for r in remaining),
    )
    assert support >= ways
    *_, logw = calls.pop(0)
    assert (logw >= v.min_log_weight).all() and (logw <= v.max_log_weight).all()
    share = n * np.exp(logw)
    share = share / share.sum()
    shots = np.minimum(np.floor(share * (support - ways)).astype(int) + 1, remaining)
    _, _, _, turns = calls.pop(0)
    images = [c[3] for c in calls]
    return classes, queries, shots, turns, images


def check_record(r, sizes, v, classes, queries, shots, turns, images):
    """The record holds exactly those draws, in the documented layout."""
    assert r.dtype == np.int32 and r.shape[1] == VARIABLE_COLUMNS
    support, query = r[r[:, 4] == 0], r[r[:, 4] == 1]
    assert len(support) + len(query) == len(r) and (np.diff(r[:, 4]) >= 0).all()  # support first
    for k, c in enumerate(classes):
        s, q = support[support[:, 3] == k], query[query[:, 3] == k]
        assert (s[:, 0] == c).all() and (q[:, 0] == c).all()
        assert len(s) == shots[k] >= 1 and len(q) == queries
        assert (s[:, 2] == turns[k]).all() and (q[:, 2] == turns[k]).all()
        chosen = np.concatenate([s[:, 1], q[:, 1]])
        assert np.array_equal(chosen, images[k])
        assert len(set(chosen.tolist())) == len(chosen) and chosen.max() < sizes[c]
    # labels in class order, class-major within each part
    assert (np.diff(support[:, 3]) >= 0).all() and (np.diff(query[:, 3]) >= 0).all()
    assert len(support) <= v.max_support


def sizes_and_groups(seed=0, classes=120, groups=6):
    g = np.random.default_rng(seed)
    sizes = g.integers(2, 300, size=classes).tolist()  # as uneven as Meta-Dataset's sources
    return sizes, [int(x) for x in g.integers(0, groups, size=classes)]


@pytest.mark.parametrize("grouped", [False, True])
def test_every_rule_holds_exactly_on_every_episode(grouped):
    v = VariableConfig()
    sizes, groups = sizes_and_groups()
    groups = groups if grouped else None
    for i in range(400):
        rng = Recorded(episode_rng(0, "train", i))
        r = sample_variable_episode(sizes, ROTATIONS, v, rng, groups)
        check_record(r, sizes, v, *expected(sizes, groups, v, rng.calls))
        if grouped:
            assert len({groups[c] for c in r[:, 0]}) == 1  # one group an episode


def test_settings_change_the_rules_they_name():
    v = VariableConfig(
        min_ways=3,
        max_ways=7,
        max_query=4,
        max_support=40,
        max_support_per_class=6,
        min_log_weight=0.0,
        max_log_weight=0.0,
    )
    sizes, _ = sizes_and_groups(1, classes=30)
    for i in range(200):
        rng = Recorded(episode_rng(3, "val", i))
        r = sample_variable_episode(sizes, ROTATIONS, v, rng)
        classes, queries, shots, turns, images = expected(sizes, None, v, rng.calls)
        check_record(r, sizes, v, classes, queries, shots, turns, images)
        assert 3 <= len(classes) <= 7 and queries <= 4 and shots.sum() <= 40


def test_ways_are_uniform_within_a_bound_from_the_sample_count():
    """Ways uniform in [5, min(50, classes)]: each value's count is Binomial(N, 1/K); every count
    within 5 standard deviations of N/K (a chance of about 6e-7 per value of failing for a correct
    sampler), and the classes drawn are uniform the same way."""
    v, N = VariableConfig(), 20000
    sizes = [20] * 40  # 40 classes: ways in 5..40
    ways = np.zeros(51, int)
    picked = np.zeros(40, int)
    for i in range(N):
        r = sample_variable_episode(sizes, ROTATIONS, v, episode_rng(0, "train", i))
        ways[r[:, 3].max() + 1] += 1
        picked[np.unique(r[:, 0])] += 1
    assert ways[:5].sum() == 0 and ways[41:].sum() == 0
    K = 36
    p = 1 / K
    bound = 5 * math.sqrt(N * p * (1 - p))
    assert np.abs(ways[5:41] - N * p).max() < bound, ways[5:41]
    # each class is in an episode with probability E[ways]/40 = 22.5/40
    q = ((5 + 40) / 2) / 40
    assert np.abs(picked - N * q).max() < 5 * math.sqrt(N * q * (1 - q)) + 1, picked


def test_images_are_drawn_at_random_not_in_file_order():
    """google-research/meta-dataset#54: a within-class order that is not random inflated a
    source's accuracy. Each image of a 20-image class is a query as often as any other."""
    v, N = VariableConfig(min_ways=5, max_ways=5), 4000
    sizes = [20] * 5
    query = np.zeros(20, int)
    for i in range(N):
        r = sample_variable_episode(sizes, ROTATIONS, v, episode_rng(0, "train", i))
        q = r[(r[:, 4] == 1) & (r[:, 0] == 0)]
        query[q[:, 1]] += 1
    # 10 queries of 20 images: each image a query with probability 1/2 in each of N episodes
    assert np.abs(query - N / 2).max() < 5 * math.sqrt(N / 4), query


def test_episodes_are_deterministic_from_seed_split_and_index():
    v = VariableConfig()
    sizes, _ = sizes_and_groups()
    a = [sample_variable_episode(sizes, ROTATIONS, v, episode_rng(0, "train", i)) for i in range(5)]
    b = [sample_variable_episode(sizes, ROTATIONS, v, episode_rng(0, "train", i)) for i in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for other in (episode_rng(1, "train", 0), episode_rng(0, "val", 0), episode_rng(0, "train", 5)):
        assert not np.array_equal(a[0], sample_variable_episode(sizes, ROTATIONS, v, other))


def test_a_split_the_sampler_cannot_draw_from_is_one_line():
    v = VariableConfig()
    with pytest.raises(DataError, match="class 1 has 1 image"):
        check_variable_split([5, 1, 5, 5, 5, 5], v, None, "train")
    with pytest.raises(DataError, match=r"the split has 4 classes, fewer than data\.variable"):
        check_variable_split([5] * 4, v, None, "val")
    with pytest.raises(DataError, match="a class group has 3 classes"):
        check_variable_split([5] * 8, v, [0] * 5 + [1] * 3, "test")
    check_variable_split([2] * 5, v, [0] * 5, "test")


# ---- training and evaluation on variable episodes ----


def test_maml_trains_and_evaluates_on_variable_episodes(variable_sources, tmp_path):
    """A zero head (each task's rows start at 0, as many as its classes): the run trains, its
    weights move, and `metadist evaluate` gives its test accuracy again."""
    from tests.conftest import run_cli, weights

    omni = variable_sources[0]
    args = [
        f"data.shards={omni}",
        "data.protocol=metadataset",
        "data.episode=variable",
        "data.variable.max_ways=8",
        "data.variable.max_support=40",
        "data.variable.groups=parent",
        "data.train_episodes=48",
        "data.val_episodes=8",
        "data.test_episodes=12",
        "data.episodes_per_shard=16",
        "algo.name=maml",
        "algo.head_init=zero",
        "algo.inner_steps=1",
        "model.hidden=8",
        "train.meta_batch_size=4",
        "train.steps=3",
        "train.val_every=3",
        "train.checkpoint_every=3",
        "eval.tasks_per_batch=4",
        "eval.inner_steps=1",
        f"run.root={tmp_path / 'runs'}",
        "run.name=v",
        "tracking.mode=disabled",
        "algo.strategy=batched",
    ]
    r = run_cli("train", *args, "train.steps=1", "run.name=start")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "v"
    start, end = weights(tmp_path / "runs" / "start"), weights(run)
    assert any(not (start[k] == end[k]).all() for k in start)  # it goes on training
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_episodes"] == 12
    e = run_cli("evaluate", "--run", run)
    assert e.returncode == 0, e.stderr[-2000:]
    assert json.loads(e.stdout.splitlines()[-1])["accuracy"] == pytest.approx(
        summary["test_accuracy"], abs=1e-6
    )
    # a learned head has a fixed number of rows: one line, nothing written
    r = run_cli("train", *args, "algo.head_init=learned", "run.name=learned")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "algo.head_init=learned" in r.stderr
    assert not (tmp_path / "runs" / "learned").exists()
    # the exercise's task folders are fixed episodes
    r = run_cli("export-tasks", *args, "--out", tmp_path / "tasks")
    assert r.returncode == 2 and "variable episodes" in r.stderr
    assert not (tmp_path / "tasks").exists()


def test_a_source_the_sampler_cannot_draw_from_is_refused_before_anything_is_written(
    omniglot_dir, tmp_path
):
    from metadist.data.synthetic import FolderSpec, write_folder_dataset
    from tests.conftest import run_cli, variable_source

    # every synthetic alphabet has 6 characters: 7 ways from one alphabet cannot be drawn
    out = tmp_path / "omni"
    r = run_cli("prepare", *variable_source(omniglot_dir, out, **{"data.variable.min_ways": 7}))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "a class group has 6 classes, fewer than data.variable.min_ways=7" in r.stderr
    assert not out.exists()
    # a class of one image: no support and query for it
    raw = write_folder_dataset(tmp_path / "raw", "folders", FolderSpec(size=28, channels=1))
    one = sorted((raw / "train").iterdir())[0]
    for extra in sorted(one.iterdir())[1:]:
        extra.unlink()
    folder = {
        "data.source": "folder",
        "data.folder.split": "folders",
        "data.image_size": 28,
        "data.channels": 1,
        "data.protocol": "alphabets",
        "data.variable.groups": "",
        "data.variable.min_ways": 3,
    }
    out = tmp_path / "folder"
    r = run_cli("prepare", *variable_source(raw, out, **folder))
    assert r.returncode == 2 and f"class '{one.name}' (train) has 1 images" in r.stderr, r.stderr
    assert not out.exists()
